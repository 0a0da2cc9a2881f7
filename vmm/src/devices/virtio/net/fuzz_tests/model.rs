//! The checks after each step: where the device wrote, whether the dirty
//! bitmap saw it, whether the counters add up, and, when the step left the
//! rings and tables alone, what went out and what came in, from a model
//! that walks descriptor chains as virtio-queue does.

use std::ops::Range;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MTU;

use super::{Fuzzer, A_END, BUFS, B_END, B_START, INDIRECT, MTU, PAGE_SIZE};
use crate::devices::virtio::net::device::{NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::net::NetStats;
use crate::devices::virtio::test_driver::{F_INDIRECT, F_NEXT, F_WRITE};
use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes as _, GuestAddress};

/// The device's chain bound (`device::MAX_CHAIN_DESCRIPTORS`).
const MAX_CHAIN: usize = 1024;

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    /// The buffer.
    pub(super) fn range(&self) -> Range<u64> {
        self.addr..self.addr.saturating_add(self.len.into())
    }
}

fn read_desc(mem: &Memory, at: u64) -> Option<Desc> {
    let b = mem.get(at, 16)?;
    Some(Desc {
        addr: u64::from_le_bytes(b[..8].try_into().unwrap()),
        len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// A copy of guest memory.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Memory {
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Memory {
    pub(super) fn of(mem: &GuestMemoryMmap) -> Self {
        let mut a = vec![0; A_END as usize];
        let mut b = vec![0; (B_END - B_START) as usize];
        mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        mem.read_slice(&mut b, GuestAddress(B_START)).unwrap();
        Self { a, b }
    }

    /// `len` bytes at `at`, if they lie in one region.
    pub(super) fn get(&self, at: u64, len: usize) -> Option<&[u8]> {
        let end = at.checked_add(len as u64)?;
        if end <= A_END {
            Some(&self.a[at as usize..end as usize])
        } else if at >= B_START && end <= B_END {
            Some(&self.b[(at - B_START) as usize..(end - B_START) as usize])
        } else {
            None
        }
    }

    /// The addresses whose bytes differ in `other`, as ranges.
    pub(super) fn changes(&self, other: &Memory) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (base, x, y) in [(0, &self.a, &other.a), (B_START, &self.b, &other.b)] {
            for (c, (xs, ys)) in x.chunks(4096).zip(y.chunks(4096)).enumerate() {
                if xs == ys {
                    continue;
                }
                for (i, (p, q)) in xs.iter().zip(ys).enumerate() {
                    if p != q {
                        let at = base + (c * 4096 + i) as u64;
                        match out.last_mut() {
                            Some(r) if r.end == at => r.end += 1,
                            _ => out.push(at..at + 1),
                        }
                    }
                }
            }
        }
        out
    }
}

/// The chain at `head` of the table at `table` (of `size` entries), as
/// virtio-queue's `DescriptorChain` walks it, and the indirect table it
/// went through, if any.
fn walk(mem: &Memory, table: u64, size: u16, head: u16) -> (Vec<Desc>, Option<Range<u64>>) {
    let (mut table, mut size, mut next, mut ttl) = (table, size, head, size);
    let mut indirect = None;
    let mut out = Vec::new();
    let mut total = 0u32;
    while ttl > 0 && next < size {
        let Some(d) = table
            .checked_add(u64::from(next) * 16)
            .and_then(|at| read_desc(mem, at))
        else {
            break;
        };
        if d.flags & F_INDIRECT != 0 {
            if indirect.is_some() || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                break;
            }
            (table, size, next) = (d.addr, (d.len / 16) as u16, 0);
            indirect = Some(d.addr..d.addr.saturating_add(d.len.into()));
            ttl = size;
            continue;
        }
        let Some(t) = total.checked_add(d.len) else {
            break;
        };
        total = t;
        if d.flags & F_NEXT != 0 {
            next = d.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        out.push(d);
        // The device refuses longer chains; their tail does not matter.
        if out.len() > MAX_CHAIN {
            break;
        }
    }
    (out, indirect)
}

/// The frame a transmit chain carries, or `None` if the device must
/// refuse the chain (as `read_tx_chain` does).
fn tx_frame(mem: &Memory, chain: &[Desc], max: usize) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for (n, d) in chain.iter().enumerate() {
        if n >= MAX_CHAIN || d.flags & F_WRITE != 0 || bytes.len() + d.len as usize > max {
            return None;
        }
        match d.len {
            0 => {}
            len => bytes.extend_from_slice(mem.get(d.addr, len as usize)?),
        }
    }
    (bytes.len() >= NET_HDR_LEN + 14).then(|| bytes.split_off(NET_HDR_LEN))
}

/// Ranges of a table's device-writable buffers, indirect tables included.
fn writable(mem: &Memory, table: u64, size: u16, out: &mut Vec<Range<u64>>) {
    let mut tables: Vec<(u64, u64)> = Vec::new();
    for i in 0..u64::from(size) {
        let Some(d) = read_desc(mem, table.wrapping_add(16 * i)) else {
            continue;
        };
        if d.flags & F_INDIRECT != 0 {
            tables.push((d.addr, u64::from(d.len / 16).min(u16::MAX.into())));
        } else if d.flags & F_WRITE != 0 {
            out.push(d.addr..d.addr.saturating_add(d.len.into()));
        }
    }
    tables.sort_unstable();
    tables.dedup();
    for (addr, n) in tables {
        // Only the entries that lie in memory can be read.
        for region in [0..A_END, B_START..B_END] {
            let first = region.start.saturating_sub(addr).div_ceil(16);
            let last = region.end.saturating_sub(addr) / 16;
            for j in first..last.min(n) {
                match read_desc(mem, addr.wrapping_add(16 * j)) {
                    Some(e) if e.flags & (F_WRITE | F_INDIRECT) == F_WRITE => {
                        out.push(e.addr..e.addr.saturating_add(e.len.into()))
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The ranges the first `len` bytes of a receive chain fill, as
/// `write_rx_chain` writes them.
fn written(chain: &[Desc], len: usize) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut done = 0;
    for d in chain {
        let n = (d.len as usize).min(len - done);
        if n > 0 {
            out.push(d.addr..d.addr + n as u64);
            done += n;
        }
    }
    assert_eq!(done, len, "used length {len} past the chain's buffers");
    out
}

fn overlaps(r: &Range<u64>, set: &[Range<u64>]) -> bool {
    set.iter().any(|s| r.start < s.end && s.start < r.end)
}

/// `set` as sorted, disjoint ranges.
fn merged(mut set: Vec<Range<u64>>) -> Vec<Range<u64>> {
    set.retain(|r| r.start < r.end);
    set.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in set {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Whether `r` lies inside one range of `set` (sorted and disjoint).
fn covered(r: &Range<u64>, set: &[Range<u64>]) -> bool {
    let i = set.partition_point(|s| s.end <= r.start);
    set.get(i)
        .is_some_and(|s| s.start <= r.start && r.end <= s.end)
}

/// A live queue's rings, as the transport holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Live {
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
    pub(super) size: u16,
    pub(super) next_used: u16,
}

impl Live {
    pub(super) fn used_range(&self) -> Range<u64> {
        self.used..self.used + 4 + 8 * u64::from(self.size)
    }

    /// Used element `i`: (descriptor id, length).
    pub(super) fn used_elem(&self, mem: &Memory, i: u16) -> Option<(u32, u32)> {
        let b = mem.get(self.used + 4 + 8 * u64::from(i % self.size), 8)?;
        Some((
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..].try_into().unwrap()),
        ))
    }
}

/// What the device and transport look like around a step.
pub(super) struct View {
    pub(super) status: u32,
    pub(super) queues: [Option<Live>; 2],
    pub(super) stats: NetStats,
    pub(super) features: u64,
}

/// One step's evidence: memory and the device before and after it, what
/// changed, and the frames the backend got.
pub(super) struct Step {
    pub(super) before: Memory,
    pub(super) after: Memory,
    pub(super) pre: View,
    pub(super) post: View,
    pub(super) changes: Vec<Range<u64>>,
    pub(super) sent: Vec<Vec<u8>>,
}

impl Step {
    /// Queue `i`, if it was live on the same rings before and after, and
    /// how many chains it used.
    fn same(&self, i: usize) -> Option<(Live, u16)> {
        match (self.pre.queues[i], self.post.queues[i]) {
            (Some(a), Some(b)) if (a.desc, a.used, a.size) == (b.desc, b.used, b.size) => {
                Some((a, b.next_used.wrapping_sub(a.next_used)))
            }
            _ => None,
        }
    }

    /// The used chain `i` of `q`, from this step: id and length.
    fn used(&self, q: Live, i: u16) -> (u16, usize) {
        let (id, len) = q
            .used_elem(&self.after, q.next_used.wrapping_add(i))
            .unwrap();
        (id as u16, len as usize)
    }
}

impl Fuzzer {
    /// Checks what the device did in a step.
    pub(super) fn check(&mut self, s: &Step) {
        let rx_bufs = self.check_memory(s);
        check_counts(s);
        self.check_content(s, &rx_bufs);
    }

    /// Where the device wrote: only into used rings and receive buffers it
    /// was offered, never once it needs a reset, and always under the
    /// dirty bitmap. Returns the receive queue's writable buffers.
    fn check_memory(&self, s: &Step) -> Vec<Range<u64>> {
        if s.pre.status & NEEDS_RESET != 0 && s.post.status & NEEDS_RESET != 0 {
            assert_eq!(s.changes, &[], "a device that needs a reset wrote memory");
        }
        for r in &s.changes {
            let mut a = r.start;
            while a < r.end {
                assert!(self.dirty(a), "{a:#x} changed, its page is not dirty");
                a = (a / PAGE_SIZE + 1) * PAGE_SIZE;
            }
        }
        let mut rx_bufs = Vec::new();
        let tables = [s.pre.queues[RX_QUEUE], s.post.queues[RX_QUEUE]];
        let first = tables[0].map(|p| (p.desc, p.size));
        for (i, rx) in tables.iter().enumerate() {
            let Some(rx) = rx.filter(|q| i == 0 || first != Some((q.desc, q.size))) else {
                continue;
            };
            writable(&s.before, rx.desc, rx.size, &mut rx_bufs);
            if !s.changes.is_empty() {
                writable(&s.after, rx.desc, rx.size, &mut rx_bufs);
            }
        }
        let mut allowed = rx_bufs.clone();
        for v in [&s.pre, &s.post] {
            allowed.extend(v.queues.iter().flatten().map(Live::used_range));
        }
        let allowed = merged(allowed);
        for r in &s.changes {
            assert!(
                covered(r, &allowed),
                "the device wrote {r:x?}, outside what it was offered"
            );
        }
        rx_bufs
    }

    /// What went out and what came in, when the step left rings, tables
    /// and transmit buffers alone, and no receive buffer hides a used ring.
    fn check_content(&mut self, s: &Step, rx_bufs: &[Range<u64>]) {
        // The indirect tables' area, then the rings.
        let mut protected = Vec::new();
        protected.push(INDIRECT..BUFS);
        for q in s.pre.queues.iter().flatten() {
            protected.push(q.desc..q.desc + 16 * u64::from(q.size));
            protected.push(q.avail..q.avail + 4 + 2 * u64::from(q.size));
        }
        let walk_used = |i: usize, protected: &mut Vec<Range<u64>>| {
            s.same(i).map(|(q, n)| {
                let chains: Vec<(usize, Vec<Desc>)> = (0..n)
                    .map(|k| {
                        let (id, len) = s.used(q, k);
                        let (chain, table) = walk(&s.before, q.desc, q.size, id);
                        protected.extend(table);
                        (len, chain)
                    })
                    .collect();
                (q, chains)
            })
        };
        let tx = walk_used(TX_QUEUE, &mut protected);
        let rx = walk_used(RX_QUEUE, &mut protected);
        for (_, chain) in tx.iter().flat_map(|(_, c)| c) {
            protected.extend(chain.iter().map(Desc::range));
        }
        let clean = !s.changes.iter().any(|r| overlaps(r, &protected))
            && !s
                .pre
                .queues
                .iter()
                .flatten()
                .any(|q| overlaps(&q.used_range(), rx_bufs));
        if !clean {
            return;
        }
        if let Some((_, chains)) = tx {
            check_sent(s, &chains);
        }
        if let Some((_, chains)) = rx {
            self.check_received(s, &chains);
        }
    }

    /// Each used receive chain holds the header and the next frame the
    /// guest has not seen (frames may be dropped, never reordered). A
    /// guest may offer one buffer twice: only bytes no later write covered
    /// still hold what the device wrote there. A chain used with length 0
    /// may have been written in part (a buffer that ran off memory).
    fn check_received(&mut self, s: &Step, chains: &[(usize, Vec<Desc>)]) {
        let used: Vec<(usize, Vec<Range<u64>>)> = chains
            .iter()
            .map(|(len, chain)| match len {
                0 => (0, chain.iter().map(Desc::range).collect()),
                _ => (*len, written(chain, *len)),
            })
            .collect();
        for (k, (len, ranges)) in used.iter().enumerate() {
            let later: Vec<Range<u64>> = used[k + 1..].iter().flat_map(|u| u.1.clone()).collect();
            let overwritten = ranges
                .iter()
                .enumerate()
                .any(|(j, r)| overlaps(r, &ranges[j + 1..]) || overlaps(r, &later));
            if *len == 0 || overwritten {
                continue;
            }
            let mut data = Vec::new();
            for r in ranges {
                let bytes = s.after.get(r.start, (r.end - r.start) as usize);
                data.extend_from_slice(bytes.expect("a written buffer is in memory"));
            }
            assert_eq!(&data[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
            let frame = &data[NET_HDR_LEN..];
            let skip = self.injected[self.seen..].iter().position(|f| f == frame);
            let skip = skip.expect("the guest got a frame that was not sent, or out of order");
            self.seen += skip + 1;
        }
    }
}

/// The counters add up with the used rings and the frames the backend got.
fn check_counts(s: &Step) {
    let (s0, s1) = (s.pre.stats, s.post.stats);
    assert_eq!(
        s.sent.len() as u64,
        s1.tx_frames - s0.tx_frames,
        "frames sent"
    );
    for f in &s.sent {
        assert!(
            (14..=1518).contains(&f.len()),
            "a frame of {} bytes went out",
            f.len()
        );
    }
    let tx = |n: NetStats| n.tx_frames + n.tx_invalid + n.tx_hook_dropped + n.tx_backend_dropped;
    if let Some((_, n)) = s.same(TX_QUEUE) {
        assert_eq!(
            u64::from(n),
            tx(s1) - tx(s0),
            "transmit chains used and counted"
        );
    }
    let rx = |n: NetStats| n.rx_frames + n.rx_bad_buffers;
    let rx_size = s1.rx_size_dropped - s0.rx_size_dropped;
    if let Some((_, n)) = s.same(RX_QUEUE) {
        let (n, counted) = (u64::from(n), rx(s1) - rx(s0));
        assert!(
            counted <= n && n <= counted + rx_size,
            "{n} receive chains used"
        );
    }
}

/// The frames that went out are those of the valid transmit chains, in
/// order, less the ones the hook or the backend dropped.
fn check_sent(s: &Step, chains: &[(usize, Vec<Desc>)]) {
    let mtu = match s.pre.features & 1 << VIRTIO_NET_F_MTU {
        0 => 1500,
        _ => usize::from(MTU),
    };
    let max = NET_HDR_LEN + 18 + mtu;
    let frames: Vec<Vec<u8>> = chains
        .iter()
        .filter_map(|(_, c)| tx_frame(&s.before, c, max))
        .collect();
    let invalid = s.post.stats.tx_invalid - s.pre.stats.tx_invalid;
    assert_eq!(
        (chains.len() - frames.len()) as u64,
        invalid,
        "invalid transmit chains"
    );
    let mut it = frames.iter();
    for f in &s.sent {
        assert!(
            it.any(|g| g == f),
            "a frame went out that no valid chain held"
        );
    }
}
