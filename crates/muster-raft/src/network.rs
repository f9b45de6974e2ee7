//! Raft RPCs to peers over tonic, one cached channel per peer.

use crate::Member;
use crate::{NodeId, TypeConfig};
use muster_proto::pb::{RaftPayload, raft_service_client::RaftServiceClient};
use openraft::RPCTypes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How to reach one control node: two listeners, so that votes and log replication between
/// control nodes never queue behind the traffic of thousands of agents (as etcd keeps its
/// peer port apart from its client port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddrs {
    /// Its Raft listener: votes, replication and snapshots, writes and reads forwarded to it.
    pub raft: String,
    /// Its agent listener, which agents are sent to when this node leads.
    pub agents: String,
    /// Its AWS Batch API, for `muster cluster status` (empty where not known).
    pub api: String,
}

/// Where each control node listens. Filled from config (and by tests that bind port 0), and
/// from the Raft membership for nodes added since ([`crate::membership::follow_membership`]);
/// the config wins, so that a node restarted on a new port is still found.
#[derive(Clone, Default)]
pub struct PeerDirectory {
    addrs: Arc<RwLock<BTreeMap<NodeId, PeerAddrs>>>,
    /// Learned from the membership, for nodes the config does not name.
    learned: Arc<RwLock<BTreeMap<NodeId, PeerAddrs>>>,
    /// Channels for writes and reads this node forwards to the leader.
    channels: ChannelCache,
}

/// How a channel to a peer is made from its endpoint (already configured with timeouts and
/// keepalive). Muster connects over TCP (`Endpoint::connect_lazy`); the deterministic
/// simulation connects over its simulated network instead.
pub type Dialer = Arc<dyn Fn(Endpoint) -> Channel + Send + Sync>;

impl PeerDirectory {
    /// A directory whose channels (and those of every cache made from it) are made by `dialer`.
    pub fn with_dialer(dialer: Dialer) -> Self {
        Self {
            addrs: Arc::default(),
            learned: Arc::default(),
            channels: ChannelCache::new(Some(dialer), None),
        }
    }

    /// A directory whose channels (and those of every cache made from it) speak TLS with
    /// `tls`, which presents this node's certificate and accepts only control nodes'.
    pub fn with_tls(tls: muster_tls::ClientTls) -> Self {
        Self {
            addrs: Arc::default(),
            learned: Arc::default(),
            channels: ChannelCache::new(None, Some(tls)),
        }
    }

    /// An empty channel cache that dials as this directory does, for a runtime of its own.
    pub(crate) fn new_channel_cache(&self) -> ChannelCache {
        ChannelCache::new(self.channels.dialer.clone(), self.channels.tls.clone())
    }

    pub fn set(&self, id: NodeId, addrs: PeerAddrs) {
        self.addrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, addrs);
    }

    /// Records where a member of the Raft membership listens; the config's addresses win.
    pub fn learn(&self, id: NodeId, addrs: PeerAddrs) {
        if addrs.raft.is_empty() {
            return;
        }
        let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
        if learned.get(&id) != Some(&addrs) {
            learned.insert(id, addrs);
        }
    }

    /// Where node `id` listens, as configured or else as the membership records it.
    pub fn get(&self, id: NodeId) -> Option<PeerAddrs> {
        let configured = self
            .addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let learned = self
            .learned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        match (configured, learned) {
            // A config may leave an address out (older configs have no API address).
            (Some(mut configured), Some(learned)) => {
                if configured.api.is_empty() {
                    configured.api = learned.api;
                }
                if configured.agents.is_empty() {
                    configured.agents = learned.agents;
                }
                Some(configured)
            }
            (configured, learned) => configured.or(learned),
        }
    }

    /// Where node `id`'s Raft listener is.
    pub(crate) fn raft_addr(&self, id: NodeId) -> Option<String> {
        self.get(id).map(|a| a.raft)
    }

    /// Where agents reach node `id`.
    pub fn agent_addr(&self, id: NodeId) -> Option<String> {
        self.get(id).map(|a| a.agents)
    }

    /// A client for node `id`'s Raft listener, over this directory's own channels.
    pub fn raft_client(&self, id: NodeId) -> Option<RaftServiceClient<Channel>> {
        let addr = self.get(id)?.raft;
        self.channels.raft_client(&addr)
    }
}

/// How often an idle connection to a peer is pinged, and how long a ping may go unanswered
/// before the connection is dropped (and made anew on the next call).
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One lazily connecting channel per address. A channel's connection is driven by a task on
/// the runtime that first asked for it, so each runtime keeps a cache of its own: Raft's
/// messages never wait on the runtime that serves agents.
#[derive(Clone, Default)]
pub(crate) struct ChannelCache {
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
    /// `None`: TCP.
    dialer: Option<Dialer>,
    /// `None`: plaintext.
    tls: Option<muster_tls::ClientTls>,
}

impl ChannelCache {
    fn new(dialer: Option<Dialer>, tls: Option<muster_tls::ClientTls>) -> Self {
        Self {
            channels: Arc::default(),
            dialer,
            tls,
        }
    }

    /// The cached channel to `addr`, created on first use. Connecting is lazy: a peer that is
    /// down costs nothing until a call is made, and the channel reconnects by itself.
    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        // HTTP/2 pings find a dead connection (a peer stopped or cut off without a reset) in
        // seconds; without them a call waits on a connection TCP keeps retrying for minutes.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(PEER_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(PEER_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let ch = match (&self.dialer, &self.tls) {
            (Some(dial), _) => dial(endpoint),
            (None, Some(tls)) => tls.connect_lazy(endpoint),
            (None, None) => endpoint.connect_lazy(),
        };
        channels.insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }

    pub(crate) fn raft_client(&self, addr: &str) -> Option<RaftServiceClient<Channel>> {
        self.channel(addr).ok().map(|channel| {
            RaftServiceClient::new(channel)
                .max_decoding_message_size(crate::MAX_RAFT_MESSAGE_BYTES)
                .max_encoding_message_size(crate::MAX_RAFT_MESSAGE_BYTES)
        })
    }
}

/// openraft's network factory: hands out one [`PeerClient`] per target. Created on the Raft
/// runtime, with channels of its own that live there.
#[derive(Clone)]
pub struct PeerNetwork {
    /// This node.
    id: NodeId,
    directory: PeerDirectory,
    channels: ChannelCache,
}

impl PeerNetwork {
    pub fn new(id: NodeId, directory: PeerDirectory) -> Self {
        Self {
            id,
            channels: directory.new_channel_cache(),
            directory,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        let addr = self
            .directory
            .get(target)
            .map_or_else(|| node.addr.clone(), |a| a.raft);
        PeerClient {
            source: self.id,
            target,
            client: self.channels.raft_client(&addr),
        }
    }
}

pub struct PeerClient {
    source: NodeId,
    target: NodeId,
    client: Option<RaftServiceClient<Channel>>,
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, serde_json::Error> {
    Ok(RaftPayload {
        data: serde_json::to_vec(value)?,
        snapshot_chunk: Vec::new(),
    })
}

/// An InstallSnapshot request with its chunk beside the JSON rather than inside it.
pub(crate) fn encode_snapshot_chunk(
    mut rpc: InstallSnapshotRequest<TypeConfig>,
) -> Result<RaftPayload, serde_json::Error> {
    let chunk = std::mem::take(&mut rpc.data);
    let mut payload = encode(&rpc)?;
    payload.snapshot_chunk = chunk;
    Ok(payload)
}

/// The inverse of [`encode_snapshot_chunk`]. A sender that put the chunk inside the JSON (an
/// earlier Muster) is understood too.
pub(crate) fn decode_snapshot_chunk(
    payload: RaftPayload,
) -> Result<InstallSnapshotRequest<TypeConfig>, serde_json::Error> {
    let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(&payload)?;
    if !payload.snapshot_chunk.is_empty() {
        rpc.data = payload.snapshot_chunk;
    }
    Ok(rpc)
}

pub(crate) fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, serde_json::Error> {
    serde_json::from_slice(&payload.data)
}

impl PeerClient {
    /// Sends one RPC and unpacks the remote `Result`. A call that ran out of time is a
    /// `Timeout`; one that could not reach the peer is `Unreachable` (openraft then sends it
    /// nothing, heartbeats included, for 500 ms); a garbled reply is a `Network` error.
    ///
    /// The distinction matters: a busy follower that answers an AppendEntries late reported
    /// as unreachable got no heartbeat for half a second, longer than its election timeout,
    /// and called an election in a healthy cluster.
    async fn call<Resp, E>(
        &mut self,
        action: RPCTypes,
        payload: Result<RaftPayload, serde_json::Error>,
        option: &RPCOption,
        rpc: RpcFn,
    ) -> Result<Resp, RPCError<NodeId, Member, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.clone() else {
            let e = std::io::Error::other(format!("no address known for node {}", self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let payload = payload.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let reply = rpc(client, request)
            .await
            .map_err(|status| match status.code() {
                // tonic's own deadline ends a call as Cancelled ("Timeout expired").
                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                    RPCError::Timeout(Timeout {
                        action,
                        id: self.source,
                        target: self.target,
                        timeout: option.hard_ttl(),
                    })
                }
                tonic::Code::Unavailable | tonic::Code::Unknown => {
                    RPCError::Unreachable(Unreachable::new(&status))
                }
                _ => RPCError::Network(NetworkError::new(&status)),
            })?;
        let result: Result<Resp, E> =
            decode(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// One generated client method, boxed, so that one `call` serves every RPC.
type RpcFn = fn(
    RaftServiceClient<Channel>,
    tonic::Request<RaftPayload>,
) -> std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>
            + Send,
    >,
>;

/// Encoded entries one AppendEntries carries at most (a single larger entry goes alone).
///
/// openraft gives every AppendEntries one heartbeat interval to complete, follower's fsync
/// included, and retries a timed-out one unchanged: a follower far behind, sent megabytes at a
/// time, would time out forever. Sending a prefix and reporting it as a partial success keeps
/// every message small enough to land in time, and the follower catches up a prefix at a time.
/// Entries themselves are kept well under this by whoever proposes them (placements per round,
/// reports and submits per batch), since an entry cannot be split.
pub const APPEND_ENTRIES_BUDGET_BYTES: usize = 512 * 1024;

/// [`AppendEntriesRequest`] as it goes on the wire, its entries already encoded: the same JSON
/// the follower decodes as an `AppendEntriesRequest`.
#[derive(Serialize)]
struct EncodedAppendEntries<'a> {
    vote: &'a openraft::Vote<NodeId>,
    prev_log_id: &'a Option<openraft::LogId<NodeId>>,
    entries: Vec<Box<serde_json::value::RawValue>>,
    leader_commit: &'a Option<openraft::LogId<NodeId>>,
}

impl<'a> EncodedAppendEntries<'a> {
    /// Encodes entries from the front of `rpc` until the next would pass `budget`; returns
    /// the message and the id of the last entry it holds when it holds fewer than all.
    fn within(
        rpc: &'a AppendEntriesRequest<TypeConfig>,
        budget: usize,
    ) -> Result<(Self, Option<openraft::LogId<NodeId>>), serde_json::Error> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        for entry in &rpc.entries {
            let encoded = serde_json::value::to_raw_value(entry)?;
            if !entries.is_empty() && bytes + encoded.get().len() > budget {
                break;
            }
            bytes += encoded.get().len();
            entries.push(encoded);
        }
        let cut_after =
            (entries.len() < rpc.entries.len()).then(|| rpc.entries[entries.len() - 1].log_id);
        let message = EncodedAppendEntries {
            vote: &rpc.vote,
            prev_log_id: &rpc.prev_log_id,
            entries,
            leader_commit: &rpc.leader_commit,
        };
        Ok((message, cut_after))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let (message, cut_after) = EncodedAppendEntries::within(&rpc, APPEND_ENTRIES_BUDGET_BYTES)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self
            .call(
                RPCTypes::AppendEntries,
                encode(&message),
                &option,
                |mut c, r| Box::pin(async move { c.append_entries(r).await }),
            )
            .await?;
        Ok(match (reply, cut_after) {
            // The follower holds everything up to the last entry sent, and no more.
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (reply, _) => reply,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let payload = encode_snapshot_chunk(rpc);
        self.call(RPCTypes::InstallSnapshot, payload, &option, |mut c, r| {
            Box::pin(async move { c.install_snapshot(r).await })
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(RPCTypes::Vote, encode(&rpc), &option, |mut c, r| {
            Box::pin(async move { c.vote(r).await })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::pb::raft_service_server::{RaftService, RaftServiceServer};
    use muster_proto::pb::{ReadIndexReply, ReadIndexRequest};
    use openraft::Vote;
    use tonic::{Request, Response, Status};

    /// A peer that takes far longer than any Raft timeout to answer.
    struct SlowPeer;

    async fn late<T>() -> Result<Response<T>, Status> {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Err(Status::internal("too late"))
    }

    #[tonic::async_trait]
    impl RaftService for SlowPeer {
        async fn append_entries(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            late().await
        }
        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            late().await
        }
        async fn install_snapshot(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            late().await
        }
        async fn propose(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            late().await
        }
        async fn admin(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            late().await
        }
        async fn read_index(
            &self,
            _: Request<ReadIndexRequest>,
        ) -> Result<Response<ReadIndexReply>, Status> {
            late().await
        }
        async fn pre_vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            late().await
        }
    }

    #[tokio::test]
    async fn a_late_answer_is_a_timeout_and_a_closed_port_is_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slow = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServiceServer::new(SlowPeer))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut network = PeerNetwork::new(1, PeerDirectory::default());
        let vote = VoteRequest::new(Vote::new(1, 1), None);

        let mut busy = network
            .new_client(
                2,
                &Member {
                    addr: slow,
                    ..Default::default()
                },
            )
            .await;
        let err = busy
            .vote(vote.clone(), RPCOption::new(Duration::from_millis(200)))
            .await
            .unwrap_err();
        // Unreachable would stop heartbeats to a live follower for 500 ms.
        assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");

        let mut gone = network
            .new_client(
                3,
                &Member {
                    addr: closed,
                    ..Default::default()
                },
            )
            .await;
        let err = gone
            .vote(vote, RPCOption::new(Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    }
}
