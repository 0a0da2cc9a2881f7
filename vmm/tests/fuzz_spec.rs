//! Fuzz targets of the speculation engine's guest-facing parts that run
//! without /dev/kvm: the checkpoint stack (`vmm::spec::stack`) under
//! random sequences of speculate, commit, abort, join, remote commit and
//! remote abort, checked against a model that keeps a full copy of memory
//! per checkpoint; and the port bus with the hypercall and exit devices
//! under port accesses of any address and size. The controller's dispatch
//! of a hypercall needs vCPUs, so the real-KVM tests cover it. How to run
//! these longer: `docs/fuzzing.md`.

#[path = "../../netbridge/tests/support/fuzz.rs"]
mod fuzz;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use fuzz::{Bytes, Seq, Target};
use guest_agent::abi::{EXIT_PORT, EXIT_PORT_LEN, HYPERCALL_PORT, HYPERCALL_PORT_LEN};
use vmm::controller::MAX_DEPTH;
use vmm::devices::bus::SharedDevice;
use vmm::devices::legacy::ExitDevice;
use vmm::devices::{Bus, VcpuTrap, WriteResult};
use vmm::event::VmEvent;
use vmm::spec::hypercall::HypercallDevice;
use vmm::spec::stack::{Entry, Fold, SpecId, SpecStack, StackError};

/// The VM under test.
const VM: u32 = 7;

/// A checkpoint's undo log: the values pages had when it was taken.
#[derive(Debug, Default)]
struct Undo(BTreeMap<u8, u32>);

impl Fold for Undo {
    fn fold_into(self, older: &mut Self) {
        for (k, v) in self.0 {
            older.0.entry(k).or_insert(v);
        }
    }
}

/// The model's frame: a full copy of memory, and the entries.
#[derive(Debug, Clone)]
struct ModelFrame {
    memory: BTreeMap<u8, u32>,
    entries: Vec<Entry>,
}

/// What the guest, the host or the network does.
#[derive(Debug)]
enum Op {
    /// The guest writes a page.
    Write(u8, u32),
    /// `speculate()`, from the guest or the host.
    Speculate,
    /// That many `speculate()`s, each followed by a write: towards the
    /// depth limit.
    Nest(u8),
    /// `commit()`.
    Commit,
    /// `abort()`.
    Abort,
    /// A frame tagged with these ids arrives (rule 2): ids of other VMs,
    /// and past ids of this one (a peer's answer to a committed one).
    Join(Seq<u8>),
    /// COMMIT of an id from the bridge (rule 6).
    RemoteCommit(u8),
    /// ABORT of an id from the bridge (rule 4).
    RemoteAbort(u8),
}

impl<'a> Arbitrary<'a> for Op {
    /// Every operation about as often as the others, except `Nest`: one
    /// time in 64, so most runs stay below the depth limit.
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=63u8)? {
            0 => Op::Nest(u.arbitrary()?),
            1..=9 => Op::Write(u.arbitrary()?, u.arbitrary()?),
            10..=18 => Op::Speculate,
            19..=27 => Op::Commit,
            28..=36 => Op::Abort,
            37..=45 => Op::Join(u.arbitrary()?),
            46..=54 => Op::RemoteCommit(u.arbitrary()?),
            _ => Op::RemoteAbort(u.arbitrary()?),
        })
    }
}

struct Machine {
    memory: BTreeMap<u8, u32>,
    stack: SpecStack<Undo>,
    model: Vec<ModelFrame>,
    /// Every id `speculate` handed out, in order and as a set, to check
    /// they never repeat.
    issued: Vec<SpecId>,
    issued_set: std::collections::HashSet<SpecId>,
}

impl Machine {
    fn new(first_seq: u32) -> Self {
        Self {
            memory: BTreeMap::new(),
            stack: SpecStack::with_first_seq(VM, MAX_DEPTH, first_seq),
            model: Vec::new(),
            issued: Vec::new(),
            issued_set: Default::default(),
        }
    }

    /// An id from a small pool: this VM's past ones, and four other VMs'.
    fn pool_id(&self, i: u8) -> SpecId {
        match (i % 5, self.issued.len()) {
            (0, n) if n > 0 => self.issued[usize::from(i / 5) % n],
            (k, _) => SpecId {
                vm: 100 + u32::from(k),
                seq: u32::from(i / 5) % 6 + 1,
            },
        }
    }

    fn write(&mut self, page: u8, val: u32) {
        let old = self.memory.get(&page).copied().unwrap_or(0);
        if let Some(top) = self.stack.top_mut() {
            top.0.entry(page).or_insert(old);
        }
        self.memory.insert(page, val);
    }

    fn push(&mut self, entries: Vec<Entry>) {
        self.model.push(ModelFrame {
            memory: self.memory.clone(),
            entries,
        });
    }

    /// The model's rollback to the lowest frame holding `id`: the explicit
    /// and implicit ids popped, newest frame first.
    fn model_rollback(&mut self, id: SpecId) -> Option<(Vec<SpecId>, Vec<SpecId>)> {
        let pos = self
            .model
            .iter()
            .position(|f| f.entries.iter().any(|e| e.id == id))?;
        let (mut aborted, mut left) = (Vec::new(), Vec::new());
        for f in self.model.drain(pos..).rev() {
            for e in f.entries {
                if e.explicit {
                    aborted.push(e.id);
                } else {
                    left.push(e.id);
                }
            }
        }
        Some((aborted, left))
    }

    /// Rolls back the stack and memory to the lowest frame holding `id`
    /// (with `abort_own` when `own`, else `rollback_to`), and checks memory
    /// is what it was when that frame was pushed.
    fn rollback(&mut self, id: SpecId, own: bool) -> bool {
        let want_memory = self
            .model
            .iter()
            .find(|f| f.entries.iter().any(|e| e.id == id))
            .map(|f| f.memory.clone());
        let want = self.model_rollback(id);
        let rb = match own {
            true => self.stack.abort_own().ok(),
            false => self.stack.rollback_to(id),
        };
        let Some(rb) = rb else {
            assert_eq!(want, None, "the stack does not hold {id}, the model does");
            return false;
        };
        assert_eq!(Some((rb.aborted, rb.left)), want, "rollback to {id}");
        for cp in rb.checkpoints {
            for (k, v) in cp.0 {
                self.memory.insert(k, v);
            }
        }
        self.memory.retain(|_, v| *v != 0);
        let mut want_memory = want_memory.expect("the model held the id");
        want_memory.retain(|_, v| *v != 0);
        assert_eq!(self.memory, want_memory, "rollback to {id} restores memory");
        true
    }

    /// The model's removal of `id` everywhere, dropping emptied frames.
    fn model_remove(&mut self, id: SpecId) -> bool {
        let mut found = false;
        for f in &mut self.model {
            let before = f.entries.len();
            f.entries.retain(|e| e.id != id);
            found |= f.entries.len() != before;
        }
        self.model.retain(|f| !f.entries.is_empty());
        found
    }

    fn model_top_explicit(&self) -> Option<SpecId> {
        self.model
            .iter()
            .rev()
            .flat_map(|f| f.entries.iter().rev())
            .find(|e| e.explicit)
            .map(|e| e.id)
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Write(page, val) => self.write(*page % 16, *val),
            Op::Nest(n) => {
                for i in 0..u32::from(*n % 80) {
                    self.step(&Op::Speculate);
                    self.write((i % 16) as u8, i + 1000);
                }
            }
            Op::Speculate => match self.stack.speculate(Undo::default()) {
                Ok(id) => {
                    assert!(self.model.len() < MAX_DEPTH);
                    assert!(self.issued_set.insert(id), "{id} handed out twice");
                    assert_eq!(id.vm, VM);
                    self.issued.push(id);
                    self.push(vec![Entry { id, explicit: true }]);
                }
                Err(e) => {
                    assert_eq!(e, StackError::TooDeep(MAX_DEPTH));
                    assert_eq!(self.model.len(), MAX_DEPTH);
                }
            },
            Op::Commit => {
                let want = self.model_top_explicit();
                match self.stack.commit_own() {
                    Ok(id) => {
                        assert_eq!(Some(id), want);
                        assert!(self.model_remove(id));
                    }
                    Err(e) => assert_eq!((e, want), (StackError::NoSpeculation, None)),
                }
            }
            Op::Abort => match self.model_top_explicit() {
                Some(id) => assert!(self.rollback(id, true)),
                None => assert!(matches!(
                    self.stack.abort_own(),
                    Err(StackError::NoSpeculation)
                )),
            },
            Op::Join(tags) => {
                let tags: Vec<SpecId> = tags.0.iter().map(|&i| self.pool_id(i)).collect();
                let missing = self.stack.missing(&tags);
                let mut want: Vec<SpecId> = Vec::new();
                for t in tags {
                    let held = self
                        .model
                        .iter()
                        .any(|f| f.entries.iter().any(|e| e.id == t));
                    if !held && !want.contains(&t) {
                        want.push(t);
                    }
                }
                assert_eq!(missing, want, "missing");
                // As the controller does: nothing to join, or no room.
                if missing.is_empty() || self.stack.can_push().is_err() {
                    return;
                }
                self.stack.join(&missing, Undo::default()).unwrap();
                let entries = missing
                    .iter()
                    .map(|&id| Entry {
                        id,
                        explicit: false,
                    })
                    .collect();
                self.push(entries);
            }
            Op::RemoteCommit(i) => {
                let id = self.pool_id(*i);
                let want = self.model_remove(id);
                assert_eq!(self.stack.remove(id), want, "remove {id}");
            }
            Op::RemoteAbort(i) => {
                let id = self.pool_id(*i);
                self.rollback(id, false);
            }
        }
        self.check();
    }

    fn check(&self) {
        let want: Vec<Entry> = self.model.iter().flat_map(|f| f.entries.clone()).collect();
        assert_eq!(self.stack.entries(), want, "entries");
        assert_eq!(self.stack.depth(), self.model.len(), "depth");
        assert!(self.stack.depth() <= MAX_DEPTH);
        let ids: Vec<SpecId> = want.iter().map(|e| e.id).collect();
        assert_eq!(self.stack.deps(), ids);
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "an id twice on the stack: {ids:?}");
        assert_eq!(self.stack.top_explicit(), self.model_top_explicit());
        // holds() on the ends (missing() is checked against the model).
        for id in [ids.first(), ids.last()].into_iter().flatten() {
            assert!(self.stack.holds(*id));
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Run {
    first_seq: u32,
    ops: Seq<Op>,
}

#[test]
fn spec_stack_any_sequence() {
    Target {
        name: "spec_stack_any_sequence",
        default_cases: 10_000,
        max_len: 2048,
    }
    .run(|r: Run| {
        // Near the end of the sequence space now and then: ids wrap.
        let first = match r.first_seq % 4 {
            0 => u32::MAX - (r.first_seq >> 2) % 8,
            _ => 1,
        };
        let mut m = Machine::new(first);
        for op in &r.ops.0 {
            m.step(op);
        }
        // Unwinding everything brings memory back to where it started.
        while let Some(id) = m
            .model
            .first()
            .and_then(|f| f.entries.first())
            .map(|e| e.id)
        {
            m.rollback(id, false);
        }
    });
}

// ---------------------------------------------------------------------
// Port I/O from a guest: the hypercall and exit devices on the bus.

/// A port access: near the devices, or anywhere.
#[derive(Debug, Arbitrary)]
enum Access {
    Write { port: Port, data: Bytes },
    Read { port: Port, len: u8 },
}

#[derive(Debug, Arbitrary)]
enum Port {
    /// An offset from the hypercall port, -8..+8.
    NearHypercall(u8),
    /// An offset from the exit port, -8..+8.
    NearExit(u8),
    /// Any address, wrapping ones included.
    Any(u64),
}

impl Port {
    fn addr(&self) -> u64 {
        let near = |base: u16, d: u8| u64::from(base) + u64::from(d % 16) - 8;
        match *self {
            Port::NearHypercall(d) => near(HYPERCALL_PORT, d),
            Port::NearExit(d) => near(EXIT_PORT, d),
            Port::Any(a) => a,
        }
    }
}

/// Whether `[addr, addr + len)` lies inside the device at `base`.
fn inside(addr: u64, len: usize, base: u16, size: u16) -> bool {
    let (base, end) = (u64::from(base), u64::from(base) + u64::from(size));
    addr >= base && addr.checked_add(len as u64).is_some_and(|e| e <= end)
}

#[test]
fn port_bus_any_access() {
    let (tx, rx) = vmm::event::channel();
    let mut bus = Bus::new();
    let hypercall: SharedDevice = Arc::new(Mutex::new(HypercallDevice));
    let exit: SharedDevice = Arc::new(Mutex::new(ExitDevice::new(tx)));
    bus.insert(hypercall, HYPERCALL_PORT.into(), HYPERCALL_PORT_LEN.into())
        .unwrap();
    bus.insert(exit, EXIT_PORT.into(), EXIT_PORT_LEN.into())
        .unwrap();
    Target {
        name: "port_bus_any_access",
        default_cases: 100_000,
        max_len: 256,
    }
    .run(|accesses: Seq<Access>| {
        for a in &accesses.0 {
            match a {
                Access::Write { port, data } => {
                    let (addr, data) = (port.addr(), &data.0[..data.0.len().min(16)]);
                    let r = bus.write(addr, data);
                    let exit_event = rx.try_recv().ok();
                    if inside(addr, data.len(), HYPERCALL_PORT, HYPERCALL_PORT_LEN) {
                        let want = match (addr == u64::from(HYPERCALL_PORT), data) {
                            (true, &[a, b, c, d]) => {
                                WriteResult::Trap(VcpuTrap::Hypercall(u32::from_le_bytes([
                                    a, b, c, d,
                                ])))
                            }
                            _ => WriteResult::Done,
                        };
                        assert_eq!(r, want, "write of {data:?} at {addr:#x}");
                        assert!(exit_event.is_none());
                    } else if inside(addr, data.len(), EXIT_PORT, EXIT_PORT_LEN) {
                        assert_eq!(r, WriteResult::Done);
                        let ends = addr == u64::from(EXIT_PORT) && matches!(data.len(), 1 | 2 | 4);
                        match exit_event {
                            Some(VmEvent::GuestExit(code)) => {
                                assert!(ends, "exit on {data:?} at {addr:#x}");
                                assert_eq!(code, data[0]);
                            }
                            None => assert!(!ends, "no exit on {data:?} at {addr:#x}"),
                            Some(e) => panic!("unexpected event {e:?}"),
                        }
                    } else {
                        assert_eq!(r, WriteResult::Unclaimed, "write at {addr:#x}");
                        assert!(exit_event.is_none());
                    }
                }
                Access::Read { port, len } => {
                    let addr = port.addr();
                    let mut data = vec![0xa5; usize::from(*len % 16)];
                    let claimed = bus.read(addr, &mut data);
                    let ours = inside(addr, data.len(), HYPERCALL_PORT, HYPERCALL_PORT_LEN)
                        || inside(addr, data.len(), EXIT_PORT, EXIT_PORT_LEN);
                    assert_eq!(claimed, ours, "read at {addr:#x}");
                    if claimed {
                        assert!(data.iter().all(|&b| b == 0), "reads return zero");
                    }
                }
            }
        }
    });
}
