//! The bridge's side of peering (docs/netbridge.md, "Peering"): a peer
//! bridge is a port whose frames carry their tags as sent, whose open ids
//! are owned on the other side, and which is told the outcome of every
//! open id it was sent. The UDP and VXLAN side is `crate::peer`.

use super::{Bridge, Send};
use crate::peer::Stats;
use crate::protocol::{Decision, Id, Outcome};
use crate::registry::{owner_vm, Lookup, PortId};
use crate::vet::{worth_logging, Vetted};

/// What the bridge answers a peer's `hold` or `find`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Outcomes it knows.
    pub decided: Vec<Decision>,
    /// Ids open here: the peer will be told their outcome.
    pub open: Vec<Id>,
}

impl Bridge {
    /// Adds the peer bridge at `addr` as `port`.
    pub fn add_peer(&mut self, port: PortId, addr: &str) {
        self.insert_port(port, true, true);
        if let Some(p) = self.ports.get_mut(&port) {
            p.peer = true;
        }
        self.event("peer-up", None, port);
        if let Some(e) = self.events.last_mut() {
            e.addr = Some(addr.to_owned());
        }
    }

    /// Whether `port` is a peer bridge.
    pub fn is_peer(&self, port: PortId) -> bool {
        self.ports.get(&port).is_some_and(|p| p.peer)
    }

    /// The tag rules for a frame from the peer `peer` (the peer's bridge
    /// vetted it for its own ports; it carries its tags as sent):
    /// - a decided id is judged by its outcome, as from any port;
    /// - an open id is kept;
    /// - an unknown id of a VM connected here is forged (the rule for
    ///   unknown ids: the peer cannot speak for this bridge's VMs);
    /// - any other unknown id is opened as a speculation owned behind the
    ///   peer. Past [`REMOTE_IDS_PER_PEER`](crate::registry::REMOTE_IDS_PER_PEER)
    ///   the frame is dropped (`dropped_ids`): untagging it would hide a
    ///   dependency.
    pub(super) fn vet_peer(&mut self, peer: PortId, tags: Vec<Id>) -> Option<Vetted> {
        let mut v = Vetted::default();
        let mut new = Vec::new();
        for id in tags {
            match self.registry.outcome(id) {
                Some(Outcome::Abort) => {
                    v.aborted = true;
                    v.kept.push(id);
                }
                Some(Outcome::Commit) => v.kept.push(id),
                None if self.registry.is_active(id) => v.kept.push(id),
                None if self.registry.vm_connected(owner_vm(id)) => v.forged.push(id),
                None => {
                    new.push(id);
                    v.kept.push(id);
                }
            }
        }
        if v.aborted || new.is_empty() {
            return Some(v);
        }
        if new.len() > self.registry.remote_room(peer) {
            if let Some(p) = self.ports.get_mut(&peer) {
                p.counters.dropped_ids += 1;
                if worth_logging(p.counters.dropped_ids) {
                    tracing::warn!(
                        port = peer,
                        "peer names more open ids than it may: frame dropped ({} so far)",
                        p.counters.dropped_ids
                    );
                }
            }
            return None;
        }
        for id in new {
            if let Ok(true) = self.registry.open_remote(id, peer) {
                self.event("remote-open", Some(id), peer);
            }
        }
        Some(v)
    }

    /// The peer `peer` told outcomes. Each one of an open id whose owner
    /// is not connected here is applied as the owner's `resolved` would be
    /// (events, anti-messages, output commit) and told to the members,
    /// other peers included. Others are ignored: this bridge's own VMs
    /// decide their ids (rule 8), and an unknown id has nobody to tell.
    pub fn peer_decided(&mut self, peer: PortId, outcomes: &[Decision]) -> (Vec<Send>, Vec<PortId>) {
        let mut sends = Vec::new();
        let mut woke = Vec::new();
        for d in outcomes {
            let Some(notices) = self.registry.decide_remote(d.id, d.outcome) else {
                continue;
            };
            woke.extend(self.apply(peer, d.id, d.outcome));
            sends.extend(self.notify(notices));
        }
        woke.sort_unstable();
        woke.dedup();
        (sends, woke)
    }

    /// The peer `peer` waits for the outcome of `ids` (`hold`, to the peer
    /// they came from): decided ones are answered; open ones are answered
    /// as open and the peer becomes a member (told when they end); an id
    /// neither open nor decided whose owner is absent counts as aborted,
    /// as for a `joined`. With `strict` false (`find`, asked of every
    /// peer) only what is known is answered.
    pub fn peer_hold(&mut self, peer: PortId, ids: &[Id], strict: bool) -> Answer {
        let mut a = Answer::default();
        for &id in ids {
            match self.registry.lookup(id) {
                Lookup::Open => {
                    self.registry.peer_sent(peer, &[id]);
                    a.open.push(id);
                }
                Lookup::Decided(outcome) if strict || self.registry.outcome(id).is_some() => {
                    a.decided.push(Decision { id, outcome });
                }
                Lookup::Decided(_) | Lookup::Unknown => {}
            }
        }
        a
    }

    /// The peer `peer` has `ids` open: for ids open here whose owner is
    /// not here and whose peer is not known, it is the peer to ask.
    pub fn peer_open(&mut self, peer: PortId, ids: &[Id]) {
        for &id in ids {
            self.registry.set_home(id, peer);
        }
    }

    /// Open ids owned behind peers, each with the peer it came from
    /// (`None`: not known), for the `hold` and `find` messages.
    pub fn remote_open(&self) -> Vec<(Id, Option<PortId>)> {
        self.registry.remote_open()
    }

    /// Announces the peering's counters (a `peer-stats` event).
    pub fn peer_stats(&mut self, stats: Stats) {
        self.event("peer-stats", None, 0);
        if let Some(e) = self.events.last_mut() {
            e.peering = Some(stats);
        }
    }
}
