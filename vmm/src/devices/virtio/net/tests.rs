//! virtio-net against queues in guest memory, as a driver sets them up.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A backend that records what is sent and hands out queued frames.
struct Fake {
    sent: Mutex<Sender<Vec<u8>>>,
    incoming: Mutex<Receiver<Vec<u8>>>,
}

impl Backend for Fake {
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let _ = self.sent.lock().unwrap().send(frame.to_vec());
        Ok(())
    }
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> std::io::Result<Option<usize>> {
        match self.incoming.lock().unwrap().recv_timeout(timeout) {
            Ok(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(Some(f.len()))
            }
            Err(_) => Ok(None),
        }
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

#[test]
fn frames_go_out_and_come_in() {
    let mem = crate::vstate::memory::create_guest_memory(32 << 20)
        .unwrap()
        .mem;
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
    let (sent_tx, sent) = channel();
    let (to_guest, incoming) = channel();
    let backend = Arc::new(Fake {
        sent: Mutex::new(sent_tx),
        incoming: Mutex::new(incoming),
    });
    let mut net = Net::new([2, 0, 0, 0, 0, 1], backend);
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), GUEST_MTU);

    // A transmit chain: the header, then the frame, in two descriptors.
    mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x30_0000))
        .unwrap();
    mem.write_slice(&[0xab; 64], GuestAddress(0x30_1000))
        .unwrap();
    txq.add_desc_chains(
        &[
            desc(0x30_0000, HDR_LEN as u32, F_NEXT, 1),
            desc(0x30_1000, 64, 0, 0),
        ],
        0,
    )
    .unwrap();
    // One receive buffer.
    rxq.add_desc_chains(&[desc(0x40_0000, 2048, F_WRITE, 0)], 0)
        .unwrap();

    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::new(evt.try_clone().unwrap()));
    let queues = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
    net.activate(mem.clone(), queues, irq.clone(), F_VERSION_1)
        .unwrap();

    net.notify(TX as u16);
    assert_eq!(
        sent.recv_timeout(Duration::from_secs(5)).unwrap(),
        vec![0xab; 64]
    );
    assert_eq!(txq.used().idx().load(), 1);

    to_guest.send(vec![0xcd; 60]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rxq.used().idx().load() == 0 {
        assert!(Instant::now() < deadline, "frame not delivered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let used = rxq.used().ring().ref_at(0).unwrap().load();
    assert_eq!(used.len(), (HDR_LEN + 60) as u32);
    let mut got = [0u8; HDR_LEN + 60];
    mem.read_slice(&mut got, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(got[HDR_NUM_BUFFERS], 1);
    assert!(got[HDR_LEN..].iter().all(|&b| b == 0xcd));
    assert_ne!(irq.status() & INT_VRING, 0);
    net.reset();
}
