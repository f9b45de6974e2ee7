//! `muster-proto`: Muster's gRPC wire types, generated from `proto/muster/v1`, and the one
//! place where they are converted to and from `muster-core` types.
//!
//! Core types derive no prost traits; nothing else in Muster defines wire types.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("muster.v1");
}

mod convert;

pub use convert::{assignment_from_pb, assignment_to_pb, inventory_from_pb, inventory_to_pb};

/// Metadata key under which a follower names the leader's gRPC address.
pub const LEADER_METADATA_KEY: &str = "muster-leader";
