//! The graph the page draws, built from the streams read: speculations
//! (nodes), joins (edges to the member's port), outcomes, and the bridges
//! as lanes, each thing at a place on the time axis.

use std::collections::{BTreeMap, BTreeSet};

use specwire::SpecId;

use crate::parse::{Malformed, Parsed, Record};

/// One named input stream.
#[derive(Debug, Clone)]
pub struct Input {
    /// Its name: the `--name` given, or the file's.
    pub name: String,
    /// What was read.
    pub parsed: Parsed,
}

/// How a speculation ended, as far as the streams say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// No stream says it ended.
    Open,
    /// Committed.
    Committed,
    /// Aborted.
    Aborted,
    /// Streams disagree: one says committed, another aborted. Never
    /// expected; drawn so that it cannot go unnoticed.
    Conflict,
}

impl Outcome {
    /// The name used in the page (`data-outcome`, CSS classes).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
            Self::Conflict => "conflict",
        }
    }

    fn with(self, other: Outcome) -> Outcome {
        match (self, other) {
            (a, Self::Open) => a,
            (Self::Open, b) => b,
            (a, b) if a == b => a,
            _ => Self::Conflict,
        }
    }
}

/// The time axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Axis {
    /// Every bridge event has its time: places are µs since `t0`, and the
    /// axis ends at `t1`.
    Time {
        /// The first event's time, µs since the Unix epoch.
        t0: u64,
        /// The last event's.
        t1: u64,
    },
    /// Some event has no time (an older bridge): each lane is drawn in
    /// its own event order, and places are fractions of the lane's events;
    /// lanes are not aligned with each other.
    Order,
}

/// A place on the axis: 0 at the start, 1 at the end.
pub type Place = f64;

/// A bridge: a lane of the picture.
#[derive(Debug, Clone, Default)]
pub struct Lane {
    /// The input's name.
    pub name: String,
    /// Every port its events name.
    pub ports: BTreeSet<u64>,
    /// The VM behind a port, where a `started` on it says (a port starts
    /// only its own VM's speculations).
    pub port_vm: BTreeMap<u64, u32>,
    /// Its bridge events.
    pub events: usize,
}

impl Lane {
    /// How a port is named in the page: `port 2`, or `port 2 · vm 1`.
    pub fn port_label(&self, port: u64) -> String {
        match self.port_vm.get(&port) {
            Some(vm) => format!("port {port} · vm {vm}"),
            None => format!("port {port}"),
        }
    }
}

/// A speculation: a node.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its id.
    pub id: SpecId,
    /// The lane it is drawn in: where it started, or where it was first
    /// seen if no stream has its start.
    pub lane: usize,
    /// The owner's port in that lane, if known.
    pub port: Option<u64>,
    /// Whether a `started` event was seen.
    pub started: bool,
    /// Where it starts.
    pub start: Place,
    /// Where it was decided, if it was.
    pub end: Option<Place>,
    /// Its outcome.
    pub outcome: Outcome,
    /// VM streams that report a rollback of it (members that rolled back).
    pub rolled_back: Vec<String>,
    /// VM streams that report joining it.
    pub vm_joins: Vec<String>,
    /// Whether `end` is its own bridge's decision.
    ended_here: bool,
}

/// A join: an edge from a speculation to the member's port.
#[derive(Debug, Clone)]
pub struct Join {
    /// The speculation joined.
    pub id: SpecId,
    /// The member's bridge.
    pub lane: usize,
    /// The member's port.
    pub port: u64,
    /// When it joined.
    pub at: Place,
    /// When the member acknowledged the outcome (it committed or rolled
    /// back), if the stream says.
    pub acked: Option<Place>,
}

/// An outcome as one bridge announced it.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The speculation.
    pub id: SpecId,
    /// The bridge.
    pub lane: usize,
    /// The port the event names (the owner's, or 0 at the end of a
    /// restart's recovery).
    pub port: u64,
    /// When.
    pub at: Place,
    /// Committed or aborted.
    pub outcome: Outcome,
}

/// Any other bridge event: port-up, port-down, lease-expired, refused,
/// forged.
#[derive(Debug, Clone)]
pub struct Mark {
    /// The event kind.
    pub kind: &'static str,
    /// The bridge.
    pub lane: usize,
    /// The port.
    pub port: u64,
    /// When.
    pub at: Place,
    /// The speculation it names, if any.
    pub id: Option<SpecId>,
}

/// What an input's bad lines were.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The input.
    pub name: String,
    /// How many lines.
    pub count: u64,
    /// The first few.
    pub examples: Vec<Malformed>,
}

/// Everything the page draws and says.
#[derive(Debug, Clone)]
pub struct Graph {
    /// The axis.
    pub axis: Axis,
    /// The bridges.
    pub lanes: Vec<Lane>,
    /// The inputs that hold only VMM events.
    pub vm_streams: Vec<String>,
    /// The speculations, by id.
    pub specs: BTreeMap<SpecId, Spec>,
    /// Every join.
    pub joins: Vec<Join>,
    /// Every outcome event.
    pub decisions: Vec<Decision>,
    /// Every other bridge event.
    pub marks: Vec<Mark>,
    /// Malformed lines, per input that had any.
    pub skipped: Vec<Skipped>,
    /// Events the bridges said they dropped for a slow reader.
    pub lagged: u64,
    /// Gaps the VMMs reported in their streams.
    pub vm_gaps: u64,
    /// Well-formed events of kinds not drawn, by kind.
    pub unknown: BTreeMap<String, u64>,
    /// Ids that only VMM streams name (no bridge stream has them).
    pub vm_only: BTreeSet<SpecId>,
    /// What the caller has to say about the inputs (shown as notes).
    pub notes: Vec<String>,
}

impl Graph {
    /// Malformed lines in all inputs.
    pub fn malformed(&self) -> u64 {
        self.skipped.iter().map(|s| s.count).sum()
    }

    /// Speculations with outcome `o`.
    pub fn count(&self, o: Outcome) -> usize {
        self.specs.values().filter(|s| s.outcome == o).count()
    }
}

/// A bridge record with its lane and place.
struct Placed<'a> {
    lane: usize,
    at: Place,
    event: &'a crate::parse::BridgeEvent,
}

/// Builds the graph. Inputs with bridge events (or with no event at all,
/// so their malformed lines still have a lane to be named in) are lanes,
/// in the order given; inputs with only VMM events annotate.
pub fn build(inputs: &[Input]) -> Graph {
    let mut lanes = Vec::new();
    let mut vm_streams = Vec::new();
    let mut lane_of = Vec::new();
    for input in inputs {
        let bridge = input
            .parsed
            .records
            .iter()
            .any(|(_, r)| matches!(r, Record::Bridge(_)));
        let vm = input
            .parsed
            .records
            .iter()
            .any(|(_, r)| matches!(r, Record::Vm(_)));
        if bridge || !vm {
            lane_of.push(Some(lanes.len()));
            lanes.push(Lane {
                name: input.name.clone(),
                ..Lane::default()
            });
        } else {
            lane_of.push(None);
            vm_streams.push(input.name.clone());
        }
    }

    let bridge_events = || {
        inputs
            .iter()
            .zip(&lane_of)
            .filter_map(|(i, l)| l.map(|l| (i, l)))
            .flat_map(|(i, l)| {
                i.parsed.records.iter().filter_map(move |(_, r)| match r {
                    Record::Bridge(e) => Some((l, e)),
                    _ => None,
                })
            })
    };
    let timed = bridge_events().all(|(_, e)| e.us.is_some());
    let times = bridge_events().filter_map(|(_, e)| e.us);
    let axis = match (timed, times.clone().min(), times.max()) {
        (true, Some(t0), Some(t1)) => Axis::Time { t0, t1 },
        _ => Axis::Order,
    };
    for (l, _) in bridge_events() {
        lanes[l].events += 1;
    }
    let mut seen = vec![0usize; lanes.len()];
    let mut placed = Vec::new();
    for (lane, event) in bridge_events() {
        let at = match axis {
            Axis::Time { t0, t1 } => {
                let us = event.us.unwrap_or(t0);
                (us - t0) as f64 / (t1 - t0).max(1) as f64
            }
            Axis::Order => seen[lane] as f64 / lanes[lane].events.saturating_sub(1).max(1) as f64,
        };
        seen[lane] += 1;
        placed.push(Placed { lane, at, event });
    }

    let mut g = Graph {
        axis,
        lanes,
        vm_streams,
        specs: BTreeMap::new(),
        joins: Vec::new(),
        decisions: Vec::new(),
        marks: Vec::new(),
        skipped: Vec::new(),
        lagged: 0,
        vm_gaps: 0,
        unknown: BTreeMap::new(),
        vm_only: BTreeSet::new(),
        notes: Vec::new(),
    };

    // Nodes first: where each speculation started, else where it was
    // first seen; then everything that refers to them.
    for p in &placed {
        let e = p.event;
        g.lanes[p.lane].ports.insert(e.port);
        let Some(id) = e.id else { continue };
        if e.kind == "started" {
            g.lanes[p.lane].port_vm.insert(e.port, id.vm);
        }
        let known = g.specs.get(&id).map(|s| s.started);
        match (known, e.kind == "started") {
            (None, _) | (Some(false), true) => {
                let spec = Spec {
                    id,
                    lane: p.lane,
                    port: (e.kind == "started").then_some(e.port),
                    started: e.kind == "started",
                    start: p.at,
                    end: None,
                    outcome: Outcome::Open,
                    rolled_back: Vec::new(),
                    vm_joins: Vec::new(),
                    ended_here: false,
                };
                g.specs.insert(id, spec);
            }
            _ => {}
        }
    }
    for p in &placed {
        let e = p.event;
        let (lane, at) = (p.lane, p.at);
        let id = e.id;
        match (e.kind, id) {
            ("joined", Some(id)) => g.joins.push(Join {
                id,
                lane,
                port: e.port,
                at,
                acked: None,
            }),
            ("acked", Some(id)) => {
                if let Some(j) = g
                    .joins
                    .iter_mut()
                    .find(|j| j.id == id && j.lane == lane && j.port == e.port && j.acked.is_none())
                {
                    j.acked = Some(at);
                }
            }
            ("committed" | "aborted", Some(id)) => {
                let outcome = match e.kind {
                    "committed" => Outcome::Committed,
                    _ => Outcome::Aborted,
                };
                g.decisions.push(Decision {
                    id,
                    lane,
                    port: e.port,
                    at,
                    outcome,
                });
                if let Some(s) = g.specs.get_mut(&id) {
                    s.outcome = s.outcome.with(outcome);
                    // Its own bridge's first decision ends the bar;
                    // another bridge's only while its own has none.
                    let own = s.lane == lane;
                    if (own && !s.ended_here) || s.end.is_none() {
                        s.end = Some(at);
                        s.ended_here = own;
                    }
                }
            }
            ("started", _) => {}
            (kind, id) => g.marks.push(Mark {
                kind,
                lane,
                port: e.port,
                at,
                id,
            }),
        }
    }

    for input in inputs {
        let name = &input.name;
        if input.parsed.malformed > 0 {
            g.skipped.push(Skipped {
                name: name.clone(),
                count: input.parsed.malformed,
                examples: input.parsed.examples.clone(),
            });
        }
        for (_, r) in &input.parsed.records {
            match r {
                Record::Lagged(n) => g.lagged = g.lagged.saturating_add(*n),
                Record::VmGap => g.vm_gaps += 1,
                Record::Unknown(k) => *g.unknown.entry(k.clone()).or_default() += 1,
                Record::Vm(v) => {
                    let Some(id) = v.id else { continue };
                    let Some(s) = g.specs.get_mut(&id) else {
                        g.vm_only.insert(id);
                        continue;
                    };
                    match v.kind {
                        "rollback" if !s.rolled_back.contains(name) => {
                            s.rolled_back.push(name.clone());
                        }
                        "join" if !s.vm_joins.contains(name) => s.vm_joins.push(name.clone()),
                        "commit" => s.outcome = s.outcome.with(Outcome::Committed),
                        "abort" => s.outcome = s.outcome.with(Outcome::Aborted),
                        _ => {}
                    }
                }
                Record::Bridge(_) => {}
            }
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::read_stream;

    fn input(name: &str, text: &str) -> Input {
        Input {
            name: name.into(),
            parsed: read_stream(text.as_bytes()).expect("reading a slice"),
        }
    }

    const A: &str = r#"{"event":"port-up","port":1,"us":1000}
{"event":"port-up","port":2,"us":1100}
{"event":"started","id":"1:1","port":1,"us":2000}
{"event":"joined","id":"1:1","port":2,"us":2500}
{"event":"committed","id":"1:1","port":1,"us":3000}
{"event":"acked","id":"1:1","port":2,"us":3100}
{"event":"started","id":"1:2","port":1,"us":4000}
{"event":"joined","id":"1:2","port":2,"us":4500}
{"event":"aborted","id":"1:2","port":1,"us":5000}
{"event":"started","id":"1:3","port":1,"us":6000}
"#;

    #[test]
    fn one_bridge_on_a_time_axis() {
        let g = build(&[input("a", A)]);
        assert_eq!(g.axis, Axis::Time { t0: 1000, t1: 6000 });
        assert_eq!(g.specs.len(), 3);
        let s = &g.specs[&SpecId::new(1, 1)];
        assert_eq!(
            (s.outcome, s.port, s.started),
            (Outcome::Committed, Some(1), true)
        );
        assert_eq!(s.start, 0.2);
        assert_eq!(s.end, Some(0.4));
        assert_eq!(g.specs[&SpecId::new(1, 2)].outcome, Outcome::Aborted);
        assert_eq!(g.specs[&SpecId::new(1, 3)].outcome, Outcome::Open);
        assert_eq!(g.specs[&SpecId::new(1, 3)].end, None);
        assert_eq!(g.joins.len(), 2);
        assert_eq!(g.joins[0].acked, Some(0.42));
        assert_eq!(g.joins[1].acked, None);
        assert_eq!(g.decisions.len(), 2);
        assert_eq!(g.marks.len(), 2);
        assert_eq!(g.lanes[0].port_label(1), "port 1 · vm 1");
        assert_eq!(g.lanes[0].port_label(2), "port 2");
    }

    #[test]
    fn two_bridges_one_speculation_and_vm_streams() {
        let b = r#"{"event":"joined","id":"1:2","port":4,"us":4600}
{"event":"aborted","id":"1:2","port":0,"us":5100}
{"event":"committed","id":"1:3","port":0,"us":7000}
"#;
        let vm = r#"{"event":"join","id":"1:2","depth":1,"by":"network"}
{"event":"rollback","id":"1:2","depth":0,"by":"network"}
{"event":"speculate","id":"9:1","depth":1,"by":"guest"}
{"ok":false,"error":"2 events were dropped: slow"}
"#;
        let g = build(&[input("a", A), input("b", b), input("vm-b", vm)]);
        assert_eq!(g.lanes.len(), 2);
        assert_eq!(g.vm_streams, ["vm-b"]);
        let s = &g.specs[&SpecId::new(1, 2)];
        assert_eq!(s.lane, 0);
        assert_eq!(s.rolled_back, ["vm-b"]);
        assert_eq!(s.vm_joins, ["vm-b"]);
        // The owner's bridge's decision ends the bar, not the other's.
        assert_eq!(s.end, Some(4000.0 / 6000.0));
        assert_eq!(g.joins.iter().filter(|j| j.lane == 1).count(), 1);
        // 1:3 is open on a, committed on b.
        assert_eq!(g.specs[&SpecId::new(1, 3)].outcome, Outcome::Committed);
        assert_eq!(
            g.vm_only.iter().copied().collect::<Vec<_>>(),
            [SpecId::new(9, 1)]
        );
        assert_eq!(g.vm_gaps, 1);
    }

    #[test]
    fn disagreeing_streams_make_a_conflict_and_no_time_means_order() {
        let a = r#"{"event":"started","id":"1:1","port":1}
{"event":"committed","id":"1:1","port":1}
"#;
        let b = "{\"event\":\"aborted\",\"id\":\"1:1\",\"port\":3}\n{\"event\":\"lagged\",\"dropped\":4}\nbad\n";
        let g = build(&[input("a", a), input("b", b)]);
        assert_eq!(g.axis, Axis::Order);
        let s = &g.specs[&SpecId::new(1, 1)];
        assert_eq!(s.outcome, Outcome::Conflict);
        assert_eq!((s.start, s.end), (0.0, Some(1.0)));
        assert_eq!(g.lagged, 4);
        assert_eq!(g.malformed(), 1);
        assert_eq!(g.skipped[0].name, "b");
    }

    #[test]
    fn a_speculation_first_seen_joined_moves_to_where_it_started() {
        let b = r#"{"event":"joined","id":"1:1","port":4,"us":2500}"#;
        let g = build(&[input("b", b), input("a", A)]);
        let s = &g.specs[&SpecId::new(1, 1)];
        assert_eq!((s.lane, s.started, s.port), (1, true, Some(1)));
    }
}
