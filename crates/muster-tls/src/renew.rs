//! What renewing a certificate needs on either side (an agent's, a control node's): when it
//! is due, and replacing the files so that a crash leaves a usable pair.

use crate::{Identity, IdentityError, TlsFiles};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A certificate is renewed once two thirds of its lifetime have passed.
pub fn due(identity: &Identity) -> SystemTime {
    let (start, end) = (identity.not_before(), identity.not_after());
    let lifetime = end.duration_since(start).unwrap_or_default();
    end - lifetime / 3
}

/// Where a renewal stages a file before it replaces it.
pub fn staged(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".new");
    path.with_file_name(name)
}

/// Replaces `files`' certificate and key with `cert_pem` and `key_pem`, which must be a valid
/// identity under `files`' CA: both are staged first, then renamed, then the folder synced.
/// A crash between the two renames leaves a pair that [`load_finishing_renewal`] completes.
pub fn replace(files: &TlsFiles, cert_pem: &str, key_pem: &str) -> Result<Identity, String> {
    let ca_pem = std::fs::read_to_string(&files.ca_file)
        .map_err(|e| format!("cannot read {}: {e}", files.ca_file.display()))?;
    let renewed = Identity::from_pem(&ca_pem, cert_pem, key_pem)
        .map_err(|(setting, problem)| format!("the renewed {setting} {problem}"))?;
    let write = |path: &Path, text: &str, private: bool| {
        crate::pki::write_pem(&staged(path), text, private)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&files.key_file, key_pem, true)?;
    write(&files.cert_file, cert_pem, false)?;
    for path in [&files.key_file, &files.cert_file] {
        std::fs::rename(staged(path), path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    if let Some(dir) = files.cert_file.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(renewed)
}

/// The identity `files` name; where a renewal was cut short between its two renames, the
/// pair it left staged is finished first.
pub fn load_finishing_renewal(section: &str, files: &TlsFiles) -> Result<Identity, IdentityError> {
    let first = Identity::load(section, files);
    if first.is_ok() {
        return first;
    }
    let (cert, key) = (&files.cert_file, &files.key_file);
    let (new_cert, new_key) = (staged(cert), staged(key));
    for (c, k) in [(&new_cert, &new_key), (&new_cert, key), (cert, &new_key)] {
        if !c.exists() || !k.exists() {
            continue;
        }
        let pair = TlsFiles {
            cert_file: c.clone(),
            key_file: k.clone(),
            ..files.clone()
        };
        if Identity::load(section, &pair).is_ok() {
            for (from, to) in [(c, cert), (k, key)] {
                if from != to {
                    let _ = std::fs::rename(from, to);
                }
            }
            tracing::warn!(file = %cert.display(), "finished a certificate renewal that was cut short");
            return Identity::load(section, files);
        }
    }
    first
}
