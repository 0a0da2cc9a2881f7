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
    /// is not connected here (from any configured peer: an id may come
    /// both from its owner's bridge and from a member's) is applied as the
    /// owner's `resolved` would be
    /// (events, anti-messages, output commit) and told to the members,
    /// other peers included. Others are ignored: this bridge's own VMs
    /// decide their ids (rule 8), and an unknown id has nobody to tell.
    pub fn peer_decided(
        &mut self,
        peer: PortId,
        outcomes: &[Decision],
    ) -> (Vec<Send>, Vec<PortId>) {
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
    /// peer) only what is known is answered. An open id that came from
    /// the asker itself is not answered: each side would take the other
    /// for the owner's (as after the asker's restart, for an id of one of
    /// its own VMs that has not come back), and the asker's recovery must
    /// decide it.
    pub fn peer_hold(&mut self, peer: PortId, ids: &[Id], strict: bool) -> Answer {
        let mut a = Answer::default();
        for &id in ids {
            match self.registry.lookup(id) {
                Lookup::Open if self.registry.home(id) == Some(peer) => {}
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

#[cfg(test)]
mod tests {
    use super::super::tests::{frame, read, strip, write};
    use super::*;
    use crate::protocol::Control;

    /// VM 1's (local) and VM 7's (behind peer 10) speculations.
    const LOCAL: Id = Id::new(1, 1);
    const REMOTE: Id = Id::new(7, 1);

    /// Ports 1 (VM 1) and 2 (VM 2) speculative, 3 a non-speculative VM,
    /// 10 and 11 peers; VM 1 started LOCAL.
    fn bridge() -> Bridge {
        let mut b = Bridge::new(read, strip).with_tag_writer(write);
        b.add_port(1, 1, true).unwrap();
        b.add_port(2, 2, true).unwrap();
        b.add_port(3, 3, false).unwrap();
        b.add_peer(10, "192.0.2.10:4789");
        b.add_peer(11, "192.0.2.11:4789");
        b.control(1, Control::Started { id: LOCAL });
        b.take_events();
        b
    }

    fn events(b: &mut Bridge) -> Vec<(String, Option<String>, PortId)> {
        b.take_events()
            .into_iter()
            .map(|e| (e.event.to_string(), e.id, e.port))
            .collect()
    }

    #[test]
    fn a_peers_id_is_opened_joined_and_decided_by_the_peer() {
        let mut b = bridge();
        let woke = b.ingress(10, frame(0xff, 70, &[REMOTE]));
        assert_eq!(woke, vec![1, 2], "to local ports only; held for 3");
        let ev = events(&mut b);
        assert!(
            ev.contains(&("remote-open".into(), Some("7:1".into()), 10)),
            "{ev:?}"
        );
        assert_eq!(b.remote_open(), vec![(REMOTE, Some(10))]);
        // Its owner is behind the peer, not absent: the join is taken.
        let (sends, _) = b.control(2, Control::Joined { ids: vec![REMOTE] });
        assert!(sends.is_empty(), "{sends:?}");
        assert_eq!(
            b.speculations(),
            vec![("1:1".into(), vec![]), ("7:1".into(), vec![2])]
        );
        // Port 2 may carry it now; its frames go to the peer as they are.
        assert_eq!(b.ingress(2, frame(70, 2, &[REMOTE])), vec![10]);
        assert_eq!(b.counters(2).unwrap().forged, 0);
        assert_eq!(b.pop(10), Some(frame(70, 2, &[REMOTE])));
        // The peer's abort: the member is told, frames of it are dropped.
        let (sends, _) = b.peer_decided(
            10,
            &[Decision {
                id: REMOTE,
                outcome: Outcome::Abort,
            }],
        );
        assert_eq!(
            sends,
            vec![Send::Control(
                2,
                Control::Decided {
                    id: REMOTE,
                    outcome: Outcome::Abort,
                    seq: 1,
                    refused: false,
                }
            )]
        );
        assert_eq!(b.pop(1), None, "purged (rule 10)");
        assert_eq!(b.usage(3).unwrap().held, 0, "the held copy too");
        assert!(
            b.ingress(10, frame(0xff, 70, &[REMOTE])).is_empty(),
            "aborted"
        );
        assert!(b.remote_open().is_empty());
    }

    #[test]
    fn output_for_a_non_speculative_port_waits_for_the_peers_commit() {
        let mut b = bridge();
        b.ingress(3, frame(0xff, 3, &[]));
        assert_eq!(b.ingress(10, frame(3, 70, &[REMOTE])), Vec::<PortId>::new());
        assert_eq!(b.usage(3).unwrap().held, 1);
        let commit = [Decision {
            id: REMOTE,
            outcome: Outcome::Commit,
        }];
        let (_, woke) = b.peer_decided(10, &commit);
        assert_eq!(woke, vec![3]);
        assert_eq!(b.pop(3), Some(strip(&frame(3, 70, &[REMOTE])).unwrap()));
        // A second word on it changes nothing.
        assert_eq!(b.peer_decided(10, &commit), (Vec::new(), Vec::new()));
    }

    #[test]
    fn a_peer_cannot_name_or_decide_this_bridges_own_ids() {
        let mut b = bridge();
        // VM 2 is connected here and never started 2:5: forged, stripped.
        let unknown = Id::new(2, 5);
        b.ingress(10, frame(0xff, 70, &[unknown]));
        assert_eq!(b.counters(10).unwrap().forged, 1);
        assert_eq!(b.pop(1), Some(frame(0xff, 70, &[])));
        assert!(b.remote_open().is_empty());
        // Rule 8: LOCAL is VM 1's to decide.
        let abort = [Decision {
            id: LOCAL,
            outcome: Outcome::Abort,
        }];
        assert_eq!(b.peer_decided(10, &abort), (Vec::new(), Vec::new()));
        assert_eq!(b.speculations()[0].0, "1:1");
    }

    #[test]
    fn peers_are_told_the_outcomes_of_what_they_were_sent() {
        let mut b = bridge();
        b.ingress(1, frame(0xff, 1, &[LOCAL]));
        assert_eq!(b.pop(10), Some(frame(0xff, 1, &[LOCAL])));
        assert_eq!(b.pop(11), Some(frame(0xff, 1, &[LOCAL])));
        let (sends, _) = b.control(
            1,
            Control::Resolved {
                id: LOCAL,
                outcome: Outcome::Commit,
            },
        );
        let told: Vec<PortId> = sends.iter().map(|Send::Control(p, _)| *p).collect();
        assert_eq!(told, vec![10, 11]);
        assert_eq!(b.unacked(10), 0, "peers ask again rather than acknowledge");
    }

    #[test]
    fn frames_from_a_peer_never_go_to_another_peer() {
        let mut b = bridge();
        assert_eq!(b.ingress(1, frame(0xff, 1, &[])), vec![2, 3, 10, 11]);
        assert_eq!(b.ingress(10, frame(0xff, 70, &[])), vec![1, 2, 3]);
        // A MAC learned behind peer 10 is sent there only.
        assert_eq!(b.ingress(2, frame(70, 2, &[])), vec![10]);
        // Peer 11 reaching a MAC behind peer 10: split horizon.
        assert!(b.ingress(11, frame(70, 71, &[])).is_empty());
    }

    #[test]
    fn hold_and_find_are_answered_with_what_is_known() {
        let mut b = bridge();
        // VM 9 was here: it committed 9:1, and is gone.
        b.add_port(4, 9, true).unwrap();
        let (done, gone) = (Id::new(9, 1), Id::new(9, 2));
        b.control(4, Control::Started { id: done });
        b.control(
            4,
            Control::Resolved {
                id: done,
                outcome: Outcome::Commit,
            },
        );
        b.remove_port(4);
        assert_eq!(
            b.peer_hold(11, &[gone], true),
            Answer::default(),
            "while recovering, an absent owner may come back"
        );
        b.end_recovery();
        let stranger = Id::new(8, 1);
        assert_eq!(
            b.peer_hold(11, &[stranger], true),
            Answer::default(),
            "VM 8 was never here: nothing to say of it"
        );
        b.ingress(10, frame(0xff, 70, &[REMOTE]));
        assert_eq!(
            b.peer_hold(10, &[REMOTE], false),
            Answer::default(),
            "not told back to the peer it came from"
        );
        let a = b.peer_hold(11, &[LOCAL, REMOTE, done, gone], true);
        assert_eq!(a.open, vec![LOCAL, REMOTE]);
        assert_eq!(
            a.decided,
            vec![
                Decision {
                    id: done,
                    outcome: Outcome::Commit
                },
                Decision {
                    id: gone,
                    outcome: Outcome::Abort
                }
            ],
            "an unknown id of a VM of this bridge that is gone counts as aborted"
        );
        let f = b.peer_hold(11, &[gone], false);
        assert_eq!(f, Answer::default(), "find says only what it knows");
        // Peer 11 asked about LOCAL: it is told the outcome.
        let (sends, _) = b.control(
            1,
            Control::Resolved {
                id: LOCAL,
                outcome: Outcome::Abort,
            },
        );
        assert!(
            sends.iter().any(|Send::Control(p, _)| *p == 11),
            "{sends:?}"
        );
        let a = b.peer_hold(11, &[LOCAL], false);
        assert_eq!(
            a.decided,
            vec![Decision {
                id: LOCAL,
                outcome: Outcome::Abort
            }]
        );
    }

    /// Found by `fuzz_peering.rs`: a peer opened 7:1, then a VM 7 connects
    /// here too (VM ids are not unique in the fabric). It started nothing:
    /// it can neither start 7:1 again nor decide it, and its going aborts
    /// nothing of the peer's (before, the bridge announced a commit and
    /// then an abort of 7:1).
    #[test]
    fn a_local_vm_with_a_peers_vm_id_cannot_take_its_ids() {
        let mut b = bridge();
        b.ingress(10, frame(0xff, 70, &[REMOTE]));
        b.add_port(7, 7, true).unwrap();
        let (sends, _) = b.control(7, Control::Started { id: REMOTE });
        assert!(sends.is_empty());
        let (sends, _) = b.control(
            7,
            Control::Resolved {
                id: REMOTE,
                outcome: Outcome::Commit,
            },
        );
        assert!(sends.is_empty());
        assert_eq!(b.counters(7).unwrap().refused, 2);
        b.remove_port(7);
        let ev = events(&mut b);
        assert!(
            !ev.iter().any(|e| e.0 == "committed" || e.0 == "aborted"),
            "{ev:?}"
        );
        assert_eq!(b.remote_open(), vec![(REMOTE, Some(10))]);
    }

    #[test]
    fn a_peer_names_a_bounded_number_of_ids() {
        let mut b = bridge();
        let max = crate::registry::REMOTE_IDS_PER_PEER as u32;
        for seq in 1..=max / 4 {
            let ids: Vec<Id> = (0..4).map(|k| Id::new(100 + k, seq)).collect();
            b.ingress(10, frame(0xff, 70, &ids));
            while b.pop(1).is_some() {}
            while b.pop(2).is_some() {}
        }
        assert_eq!(b.remote_open().len(), max as usize);
        b.ingress(10, frame(0xff, 70, &[Id::new(200, 1)]));
        assert_eq!(b.counters(10).unwrap().dropped_ids, 1);
        assert_eq!(b.remote_open().len(), max as usize);
    }
}
