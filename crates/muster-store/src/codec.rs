//! Versioned encoding of stored values.

use crate::FORMAT_VERSION;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io;

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, io::Error> {
    let mut buf = vec![FORMAT_VERSION];
    serde_json::to_writer(&mut buf, value).map_err(io::Error::other)?;
    Ok(buf)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, io::Error> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => serde_json::from_slice(body).map_err(io::Error::other),
        Some((v, _)) => Err(io::Error::other(format!(
            "stored value has unknown format version {v}"
        ))),
        None => Err(io::Error::other("stored value is empty")),
    }
}
