//! The virtio-mmio transport's part of a device's saved state: the
//! registers, the negotiated features and every queue (its registers and
//! virtio-queue's own state, with next_avail and next_used). Each device's
//! `persist.rs` wraps it with the device's own fields.

use virtio_queue::QueueState;

use super::{QueueRegs, SavedQueue, TransportState};
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};

impl Encode for TransportState {
    fn encode(&self, w: &mut Writer) {
        for v in [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
            self.interrupt_status,
            self.config_generation,
        ] {
            w.u32(v);
        }
        w.u64(self.driver_features);
        w.u32(self.queues.len() as u32);
        for q in &self.queues {
            q.encode(w);
        }
    }
}

impl Decode for TransportState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut v = [0u32; 6];
        for x in v.iter_mut() {
            *x = r.u32("virtio transport register")?;
        }
        let driver_features = r.u64("virtio driver features")?;
        let n = r.count(60, "virtio queue count")?;
        let queues = (0..n)
            .map(|_| SavedQueue::decode(r))
            .collect::<Result<_, _>>()?;
        Ok(TransportState {
            status: v[0],
            device_features_sel: v[1],
            driver_features_sel: v[2],
            driver_features,
            queue_sel: v[3],
            interrupt_status: v[4],
            config_generation: v[5],
            queues,
        })
    }
}

impl Encode for SavedQueue {
    /// 60 bytes: the registers, then the queue's sizes, indices, flags and
    /// ring addresses.
    fn encode(&self, w: &mut Writer) {
        w.u32(self.regs.num);
        w.u64(self.regs.desc);
        w.u64(self.regs.driver);
        w.u64(self.regs.device);
        let s = &self.queue;
        for v in [s.max_size, s.next_avail, s.next_used, s.size] {
            w.u16(v);
        }
        w.bool(s.event_idx_enabled);
        w.bool(s.ready);
        for v in [s.desc_table, s.avail_ring, s.used_ring] {
            w.u64(v);
        }
    }
}

impl Decode for SavedQueue {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let regs = QueueRegs {
            num: r.u32("queue num")?,
            desc: r.u64("queue desc")?,
            driver: r.u64("queue driver")?,
            device: r.u64("queue device")?,
        };
        let queue = QueueState {
            max_size: r.u16("queue max size")?,
            next_avail: r.u16("queue next avail")?,
            next_used: r.u16("queue next used")?,
            size: r.u16("queue size")?,
            event_idx_enabled: r.bool("queue event idx")?,
            ready: r.bool("queue ready")?,
            desc_table: r.u64("queue desc table")?,
            avail_ring: r.u64("queue avail ring")?,
            used_ring: r.u64("queue used ring")?,
        };
        Ok(SavedQueue { regs, queue })
    }
}
