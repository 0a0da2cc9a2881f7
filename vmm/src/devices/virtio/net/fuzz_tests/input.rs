//! What the hostile guest does, as `arbitrary` builds it: addresses,
//! lengths, operations, the driver's set-up, and the hook's script.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};

use super::fuzz::{Bytes, Rare, Seq};
use super::{A_END, BUFS, B_END, B_START, INDIRECT};
use crate::devices::virtio::net::{FrameHook, RxVerdict};
use crate::devices::virtio::test_driver::Ring;

/// A guest address.
#[derive(Debug)]
pub(super) enum Addr {
    Buf(u16),
    RegionB(u16),
    Indirect(u8),
    /// Over the rings and tables.
    Rings(u16),
    /// Just before the end of a region: the buffer runs off it.
    NearEnd(bool, u8),
    Hole(u16),
    Any(u64),
}

impl<'a> Arbitrary<'a> for Addr {
    /// Mostly in the buffer areas; now and then over the rings, off the
    /// end of a region, in the hole or anywhere.
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=19u8)? {
            0..=9 => Addr::Buf(u.arbitrary()?),
            10..=12 => Addr::RegionB(u.arbitrary()?),
            13 => Addr::Indirect(u.arbitrary()?),
            14..=15 => Addr::Rings(u.arbitrary()?),
            16 => Addr::NearEnd(u.arbitrary()?, u.arbitrary()?),
            17 => Addr::Hole(u.arbitrary()?),
            _ => Addr::Any(u.arbitrary()?),
        })
    }
}

impl Addr {
    pub(super) fn get(&self) -> u64 {
        match *self {
            Addr::Buf(x) => BUFS + u64::from(x) % (A_END - BUFS),
            Addr::RegionB(x) => B_START + u64::from(x) % (B_END - B_START),
            Addr::Indirect(s) => INDIRECT + u64::from(s % 16) * 0x100,
            Addr::Rings(x) => u64::from(x) % INDIRECT,
            Addr::NearEnd(b, d) => [A_END, B_END][usize::from(b)] - u64::from(d),
            Addr::Hole(x) => A_END + u64::from(x) % (B_START - A_END),
            Addr::Any(a) => a,
        }
    }
}

/// A buffer length.
#[derive(Debug)]
pub(super) enum Len {
    Small(u8),
    Frame(u16),
    /// Header, Ethernet header, and up to 1500 bytes.
    Fits(u16),
    /// An indirect table's length: 16 bytes a descriptor.
    Table(u8),
    Zero,
    Huge(u32),
}

impl<'a> Arbitrary<'a> for Len {
    /// Mostly lengths a frame fits in; now and then zero, a table's or a
    /// huge one.
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=19u8)? {
            0..=6 => Len::Fits(u.arbitrary()?),
            7..=10 => Len::Small(u.arbitrary()?),
            11..=14 => Len::Frame(u.arbitrary()?),
            15 => Len::Zero,
            16..=17 => Len::Table(u.arbitrary()?),
            _ => Len::Huge(u.arbitrary()?),
        })
    }
}

impl Len {
    pub(super) fn get(&self) -> u32 {
        match *self {
            Len::Small(n) => n.into(),
            Len::Frame(n) => u32::from(n) % 2048,
            Len::Fits(n) => 26 + u32::from(n) % 1500,
            Len::Table(n) => 16 * u32::from(n % 17),
            Len::Zero => 0,
            Len::Huge(n) => n,
        }
    }
}

/// What the guest does.
#[derive(Debug)]
pub(super) enum Op {
    /// Writes descriptor `index` of a queue's table.
    Desc {
        tx: bool,
        index: u16,
        addr: Addr,
        len: Len,
        flags: u8,
        odd_flags: Rare<u16>,
        next: u16,
    },
    /// Writes descriptor `index` of indirect table `slot`.
    IndirectDesc {
        slot: u8,
        index: u8,
        addr: Addr,
        len: Len,
        flags: u8,
        next: u8,
    },
    /// Writes a chain of these buffers from descriptor `head` on, as a
    /// driver would, and offers it.
    Chain {
        tx: bool,
        head: u16,
        bufs: Few<(Addr, Len)>,
    },
    /// Offers the chain at `head` (any number, now and then).
    Offer {
        tx: bool,
        head: u16,
        wild: Rare<u16>,
    },
    /// Sets the avail index to anything.
    AvailIdx { tx: bool, idx: u16 },
    /// Notifies a queue (0 or 1, or any number now and then).
    Notify { tx: bool, wild: Rare<u32> },
    /// A frame arrives from the network.
    Receive { len: u16, fill: u8 },
    /// The backend's event (the receive thread's work).
    Backend,
    /// The controller resumes receive (after a pause or a deferral).
    ResumeRx,
    /// The guest writes memory: frame bytes, or over anything.
    Fill { addr: Addr, data: Bytes },
    /// A register write, anything anywhere.
    Reg { offset: u16, value: u32 },
    /// A register or configuration read of any width.
    Read { offset: u16, len: u8 },
    /// A new script for the hook.
    Hook(Bytes),
    /// A reset, and the driver's set-up again.
    Reinit(Setup),
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let tx = bool::arbitrary(u)?;
        Ok(match u.int_in_range(0..=99u8)? {
            0..=17 => Op::Desc {
                tx,
                index: u.arbitrary()?,
                addr: u.arbitrary()?,
                len: u.arbitrary()?,
                flags: u.arbitrary()?,
                odd_flags: u.arbitrary()?,
                next: u.arbitrary()?,
            },
            18..=23 => Op::IndirectDesc {
                slot: u.arbitrary()?,
                index: u.arbitrary()?,
                addr: u.arbitrary()?,
                len: u.arbitrary()?,
                flags: u.arbitrary()?,
                next: u.arbitrary()?,
            },
            24..=39 => Op::Chain {
                tx,
                head: u.arbitrary()?,
                bufs: u.arbitrary()?,
            },
            40..=50 => Op::Offer {
                tx,
                head: u.arbitrary()?,
                wild: u.arbitrary()?,
            },
            51 => Op::AvailIdx {
                tx,
                idx: u.arbitrary()?,
            },
            52..=65 => Op::Notify {
                tx,
                wild: u.arbitrary()?,
            },
            66..=75 => Op::Receive {
                len: u.arbitrary()?,
                fill: u.arbitrary()?,
            },
            76..=77 => Op::Backend,
            78..=79 => Op::ResumeRx,
            80..=87 => Op::Fill {
                addr: u.arbitrary()?,
                data: u.arbitrary()?,
            },
            88..=91 => Op::Reg {
                offset: u.arbitrary()?,
                value: u.arbitrary()?,
            },
            92..=94 => Op::Read {
                offset: u.arbitrary()?,
                len: u.arbitrary()?,
            },
            95 => Op::Hook(u.arbitrary()?),
            _ => Op::Reinit(u.arbitrary()?),
        })
    }
}

/// A short list: 1 to 4 items, now and then up to 64.
#[derive(Debug)]
pub(super) struct Few<T>(pub(super) Vec<T>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Few<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = match u8::arbitrary(u)? {
            b @ 0..=239 => 1 + b % 4,
            b => 1 + b % 64,
        };
        (0..n)
            .map(|_| T::arbitrary(u))
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// How the driver sets the device up.
#[derive(Debug, Arbitrary)]
pub(super) struct Setup {
    /// Accepted features, when not the offered ones.
    pub(super) features: Rare<u64>,
    /// Accept the offered features but MTU.
    pub(super) no_mtu: bool,
    pub(super) rx: RingSetup,
    pub(super) tx: RingSetup,
    /// Leave DRIVER_OK out.
    pub(super) no_driver_ok: Rare<()>,
    /// Leave the rings as they were (a driver clears them).
    pub(super) stale_rings: Rare<()>,
}

#[derive(Debug, Arbitrary)]
pub(super) struct RingSetup {
    /// Size 2^(n % 9), 1 to 256.
    pub(super) size_log: u8,
    /// QueueNum, when not the size.
    pub(super) num: Rare<u32>,
    /// The rings' base, when not the usual place.
    pub(super) base: Rare<u64>,
}

impl RingSetup {
    pub(super) fn ring(&self, base: u64) -> Ring {
        let base = self.base.0.map_or(base, |b| b % B_END);
        let ring = Ring::new(base, 1 << (self.size_log % 9));
        match self.num.0 {
            Some(n) => ring.with_size(n),
            None => ring,
        }
    }
}

#[derive(Debug, Arbitrary)]
pub(super) struct Input {
    pub(super) setup: Setup,
    pub(super) ops: Seq<Op>,
}

/// The hook: reads its decisions from a script, passes everything once
/// the script is used up.
pub(super) struct ScriptHook(pub(super) Arc<Mutex<VecDeque<u8>>>);

impl ScriptHook {
    fn next(&self) -> Option<u8> {
        self.0.lock().unwrap().pop_front()
    }
}

impl FrameHook for ScriptHook {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        match self.next() {
            Some(b) if b % 8 == 0 => None,
            _ => Some(frame),
        }
    }

    fn on_rx(&mut self, _frame: &mut Vec<u8>) -> RxVerdict {
        match self.next().map(|b| b % 8) {
            Some(0) => RxVerdict::Drop,
            Some(1) => RxVerdict::DeferUntilCheckpoint,
            _ => RxVerdict::Deliver,
        }
    }

    fn tx_ready(&mut self) -> bool {
        !matches!(self.next(), Some(b) if b % 16 == 0)
    }
}
