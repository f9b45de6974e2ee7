//! Muster's integration tests: one binary, topics as modules. Clusters run in this process
//! on port 0 with real Raft on real sled directories and real gRPC between nodes; agents use
//! the process executor. Every wait has a deadline; nothing sleeps for a fixed time to pass.

mod bad_input;
mod cluster;
mod config;
mod docker_engine;
mod failover;
mod harness;
mod jobs;
mod layering;
mod liveness;
mod membership;
mod partitions;
mod processes;
mod restart;
mod security;
mod semantics;
mod sim;
mod upgrade;
