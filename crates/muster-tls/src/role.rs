//! What a certificate's holder is, and who is on the other end of an RPC.

use std::fmt;
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

/// The DNS name in every control node's certificate: agents and peers dial control nodes
/// with it as the TLS server name.
pub const CONTROL_SERVER_NAME: &str = "control.muster";
/// The DNS name in every agent's certificate: control nodes read logs from agents with it.
pub const AGENT_SERVER_NAME: &str = "agent.muster";

const URI_PREFIX: &str = "muster://";

/// What a certificate's holder is in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Control node with this Raft id.
    Control(u64),
    /// The agent that registers under this node name.
    Agent(String),
}

impl Role {
    /// The URI subject alternative name that carries the role.
    pub fn uri(&self) -> String {
        match self {
            Role::Control(id) => format!("{URI_PREFIX}control/{id}"),
            Role::Agent(name) => format!("{URI_PREFIX}agent/{name}"),
        }
    }

    fn from_uri(uri: &str) -> Option<Role> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "control" => name.parse().ok().map(Role::Control),
            "agent" if !name.is_empty() => Some(Role::Agent(name.to_owned())),
            _ => None,
        }
    }

    /// The DNS name a certificate of this role carries (see [`CONTROL_SERVER_NAME`]).
    pub fn server_name(&self) -> &'static str {
        match self {
            Role::Control(_) => CONTROL_SERVER_NAME,
            Role::Agent(_) => AGENT_SERVER_NAME,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Control(id) => write!(f, "control node {id}"),
            Role::Agent(name) => write!(f, "agent {name}"),
        }
    }
}

/// The role a certificate (DER) names. Its chain has already been verified by the TLS layer;
/// this only reads what the CA wrote.
pub fn role_of_certificate(der: &[u8]) -> Result<Role, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?
        .ok_or("the certificate names no role (no subject alternative names)")?;
    let mut roles = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => Some(Role::from_uri(uri)),
            _ => None,
        });
    match (roles.next(), roles.next()) {
        (Some(Some(role)), None) => Ok(role),
        (Some(None), _) => Err("the certificate's role is malformed".into()),
        (Some(_), Some(_)) => Err("the certificate names more than one role".into()),
        (None, _) => Err("the certificate names no role".into()),
    }
}

/// Who sent `request`, from the client certificate its TLS connection presented.
/// `UNAUTHENTICATED` when it presented none (a joining agent, or a plaintext connection to a
/// TLS port, which never gets this far) or its certificate names no role.
pub fn peer_role<T>(request: &Request<T>) -> Result<Role, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated("this call needs a client certificate of the cluster")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        Status::unauthenticated("this call needs a client certificate of the cluster")
    })?;
    role_of_certificate(leaf).map_err(Status::unauthenticated)
}

/// When the client certificate of `request` was issued (see [`crate::pki::issued_at`]).
pub fn peer_issued_at<T>(request: &Request<T>) -> Option<std::time::SystemTime> {
    crate::pki::issued_at(request.peer_certs()?.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_uri() {
        for role in [Role::Control(3), Role::Agent("gpu-node-7".into())] {
            assert_eq!(Role::from_uri(&role.uri()), Some(role));
        }
        for bad in [
            "muster://control/x",
            "muster://agent/",
            "muster://root/1",
            "muster:/control/1",
        ] {
            assert_eq!(Role::from_uri(bad), None, "{bad}");
        }
    }
}
