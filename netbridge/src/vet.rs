//! Which ids a port's frames may carry (SPECULATIONS.md, rule 12: a tag is
//! trusted only from a VMM port, and only for ids its VM started or
//! joined). Pure logic over the [`Registry`]; the bridge applies the
//! verdict. See `docs/netbridge.md`, "Which ids a port may use".

use crate::codec;
use crate::protocol::{Id, Outcome};
use crate::registry::{PortId, Registry};

/// Writes `ids` as a frame's whole tag, replacing the one it had: the
/// bridge keeps the ids a port may carry and drops the forged ones.
pub type TagWriter = fn(&[u8], &[Id]) -> Result<Vec<u8>, String>;

/// The codec's [`codec::retag`] as a [`TagWriter`]: the bridge's default.
pub fn retag(frame: &[u8], ids: &[Id]) -> Result<Vec<u8>, String> {
    codec::retag(frame, ids).map_err(|e| e.to_string())
}

/// What the bridge makes of the tag on a frame from one port.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Vetted {
    /// Ids the frame keeps: ones the port may carry, and decided ones
    /// (judged by their outcome, below).
    pub kept: Vec<Id>,
    /// Ids the port may not carry: open ids it neither started nor joined,
    /// and ids that are neither open nor decided (never started, or of an
    /// owner not connected). They are stripped.
    pub forged: Vec<Id>,
    /// A kept id has aborted: the frame is dropped (rule 10).
    pub aborted: bool,
}

/// Sorts the ids of a frame's tag from `port`. `trusted` is false for a
/// port with no VM behind it (the uplink): every id on its frames is
/// forged. A decided id is kept whoever sends it: an aborted one drops the
/// frame (rule 10), and a committed one is harmless (a receiver that joins
/// it hears the commit at once); both reach honest ports in frames sent
/// just before the outcome.
pub fn vet(registry: &Registry, port: PortId, trusted: bool, tags: Vec<Id>) -> Vetted {
    let mut v = Vetted::default();
    for id in tags {
        if !trusted {
            v.forged.push(id);
            continue;
        }
        match registry.outcome(id) {
            Some(Outcome::Abort) => {
                v.aborted = true;
                v.kept.push(id);
            }
            Some(Outcome::Commit) => v.kept.push(id),
            None if registry.may_carry(port, id) => v.kept.push(id),
            None => v.forged.push(id),
        }
    }
    v
}

/// Whether the `n`th forgery or refusal of a port is logged: the 1st, 2nd,
/// 4th, 8th... A hostile port cannot flood the log; the counters keep the
/// exact number.
pub fn worth_logging(n: u64) -> bool {
    n.is_power_of_two()
}

/// Ids as `vm:seq, ...`.
pub fn show_all(ids: &[Id]) -> String {
    ids.iter().map(Id::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(vm: u32, seq: u32) -> Id {
        Id::new(vm, seq)
    }

    #[test]
    fn ids_are_sorted_by_the_ports_rights() {
        let mut r = Registry::new();
        r.add_port(1, 1).unwrap();
        r.add_port(2, 2).unwrap();
        let (own, theirs, done, gone) = (id(1, 1), id(2, 1), id(2, 2), id(2, 3));
        r.started(1, own).unwrap();
        r.started(2, theirs).unwrap();
        r.started(2, done).unwrap();
        r.started(2, gone).unwrap();
        r.resolved(2, done, Outcome::Commit).unwrap();
        let tags = vec![own, theirs, done, id(3, 1)];
        assert_eq!(
            vet(&r, 1, true, tags.clone()),
            Vetted {
                kept: vec![own, done],
                forged: vec![theirs, id(3, 1)],
                aborted: false
            }
        );
        let untrusted = vet(&r, 1, false, tags.clone());
        assert_eq!((untrusted.kept.len(), untrusted.forged), (0, tags));
        r.resolved(2, gone, Outcome::Abort).unwrap();
        assert!(vet(&r, 1, true, vec![gone]).aborted);
    }

    #[test]
    fn logging_thins_out() {
        let logged: Vec<u64> = (1..=100).filter(|&n| worth_logging(n)).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(
            show_all(&[id(7, 4_294_967_295), id(1, 2)]),
            "7:4294967295, 1:2"
        );
    }
}
