//! `muster-sigv4`: AWS Signature Version 4 exactly as botocore builds it.
//!
//! [`canonical_request`], [`string_to_sign`] and [`signature`] are the three steps of the
//! algorithm; [`sign`] adds the headers to an outgoing request (for Muster's own clients) and
//! [`parse_authorization`] + [`verify`] check an incoming one (for the API). Pure: no clock
//! (times are inputs), no IO. HMAC and SHA-256 come from the RustCrypto crates; signatures
//! are compared in constant time.

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// What botocore leaves unescaped in a path: unreserved characters and `/`.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// A request as SigV4 sees it.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path exactly as sent on the wire (already percent-encoded by the client).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: &'a str,
    /// Header names and values; names are matched case-insensitively.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// `Credential=AKID/20261125/us-east-1/batch/aws4_request, SignedHeaders=..., Signature=...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `YYYYMMDD`
    pub date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

impl Authorization {
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Authorization header is not {ALGORITHM}: {0}")]
    Malformed(String),
    #[error("the request signature we calculated does not match the signature you provided")]
    SignatureMismatch,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    // Every request hashes and signs several times; formatting byte by byte through
    // `fmt` cost more than the hashing.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Parses the `Authorization` header.
pub fn parse_authorization(header: &str) -> Result<Authorization, AuthError> {
    let malformed = |why: &str| AuthError::Malformed(why.to_owned());
    let rest = header
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| malformed("unknown algorithm"))?
        .trim();
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| malformed("expected key=value"))?;
        match key {
            "Credential" => credential = Some(value),
            "SignedHeaders" => signed = Some(value),
            "Signature" => signature = Some(value),
            _ => return Err(malformed("unknown component")),
        }
    }
    let credential = credential.ok_or_else(|| malformed("Credential missing"))?;
    let parts: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, terminator] = parts[..] else {
        return Err(malformed(
            "Credential must be KEY/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    if terminator != "aws4_request" || date.len() != 8 || key.is_empty() {
        return Err(malformed(
            "Credential scope is not DATE/REGION/SERVICE/aws4_request",
        ));
    }
    let signature = signature.ok_or_else(|| malformed("Signature missing"))?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed("Signature must be 64 hex digits"));
    }
    let signed_headers: Vec<String> = signed
        .ok_or_else(|| malformed("SignedHeaders missing"))?
        .split(';')
        .map(str::to_ascii_lowercase)
        .collect();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(malformed("the host header must be signed"));
    }
    Ok(Authorization {
        access_key_id: key.to_owned(),
        date: date.to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
        signed_headers,
        signature: signature.to_ascii_lowercase(),
    })
}

/// The canonical request (step 1). The path is percent-encoded once more, as botocore does
/// for every service but S3; the query pairs are sorted as sent; the payload hash is computed
/// from the body.
pub fn canonical_request(req: &Request<'_>, signed_headers: &[String]) -> String {
    let path = if req.path.is_empty() { "/" } else { req.path };
    let canonical_path = utf8_percent_encode(path, PATH).to_string();
    let mut pairs: Vec<(&str, &str)> = req
        .query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut headers = String::new();
    for name in signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method.to_ascii_uppercase(),
        canonical_path,
        query.join("&"),
        headers,
        signed_headers.join(";"),
        sha256_hex(req.body)
    )
}

/// The string to sign (step 2). `amz_date` is the `X-Amz-Date` value, `YYYYMMDDTHHMMSSZ`.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The signature (step 3), hex-encoded.
pub fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> String {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hex(&hmac(&k_signing, string_to_sign.as_bytes()))
}

/// Checks `auth` against the request with the caller's secret. Constant time in the
/// signature comparison, so the answer's timing does not say which byte differed.
pub fn verify(
    req: &Request<'_>,
    auth: &Authorization,
    amz_date: &str,
    secret: &str,
) -> Result<(), AuthError> {
    let canonical = canonical_request(req, &auth.signed_headers);
    let to_sign = string_to_sign(amz_date, &auth.scope(), &canonical);
    let expected = signature(secret, &auth.date, &auth.region, &auth.service, &to_sign);
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(())
    } else {
        Err(AuthError::SignatureMismatch)
    }
}

/// Parses `X-Amz-Date` (`YYYYMMDDTHHMMSSZ`) into seconds since the Unix epoch.
pub fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 || y < 1970
    {
        return None;
    }
    Some(days_from_civil(y as i64, mo as i64, d as i64) as u64 * 86_400 + h * 3600 + mi * 60 + se)
}

/// Formats seconds since the Unix epoch as `X-Amz-Date`.
pub fn format_amz_date(unix_secs: u64) -> String {
    let (y, mo, d) = civil_from_days((unix_secs / 86_400) as i64);
    let rem = unix_secs % 86_400;
    format!(
        "{y:04}{mo:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Formats seconds since the Unix epoch as ISO 8601 (`2026-11-26T01:23:45Z`).
pub fn iso8601(unix_secs: u64) -> String {
    let (y, mo, d) = civil_from_days((unix_secs / 86_400) as i64);
    let rem = unix_secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Proleptic Gregorian calendar conversions (H. Hinnant, "chrono-Compatible Low-Level Date
// Algorithms").
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Signs an outgoing request the way botocore does: returns the `X-Amz-Date` and
/// `Authorization` headers to add. `headers` must already hold `host` (and any other header
/// to sign, such as `content-type`).
pub fn sign(
    req: &Request<'_>,
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    amz_date: &str,
) -> Vec<(String, String)> {
    let date = &amz_date[..8.min(amz_date.len())];
    let mut with_date: Vec<(String, String)> = req.headers.to_vec();
    with_date.push(("x-amz-date".to_owned(), amz_date.to_owned()));
    let mut signed: Vec<String> = with_date
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    signed.sort();
    signed.dedup();
    let dated = Request {
        headers: &with_date,
        ..*req
    };
    let canonical = canonical_request(&dated, &signed);
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = string_to_sign(amz_date, &scope, &canonical);
    let sig = signature(secret, date, region, service, &to_sign);
    vec![
        ("x-amz-date".to_owned(), amz_date.to_owned()),
        (
            "authorization".to_owned(),
            format!(
                "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={sig}",
                signed.join(";")
            ),
        ),
    ]
}

#[cfg(test)]
mod tests;
