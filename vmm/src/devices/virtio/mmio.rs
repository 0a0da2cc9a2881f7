//! The virtio-mmio transport, version 2 (virtio 1.x, "modern"): the
//! register window through which a driver finds a device, negotiates
//! features, sets up queues and starts it.
//!
//! Register offsets and semantics follow the virtio specification,
//! section 4.2.2. Configuration space starts at [`CONFIG_OFFSET`].

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{Interrupt, VirtioDevice};
use crate::devices::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// Size of one device's register window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// Where the device's configuration space starts in the window.
pub const CONFIG_OFFSET: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID: "SPVM" would be cute, but 0 says "no particular vendor".
const VENDOR_ID: u32 = 0;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Device status bits (virtio spec 2.1).
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&n| Queue::new(n).ok())
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let sel = |v: u64, s: u32| match s {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => sel(self.device.features(), self.device_features_sel),
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue registers may change only before the driver is done.
        let setup = !self.active;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if setup => self.with_queue(|q| q.set_size(v as u16)),
            REG_QUEUE_READY if setup => self.with_queue(|q| q.set_ready(v == 1)),
            REG_QUEUE_DESC_LOW if setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            REG_QUEUE_DESC_HIGH if setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            REG_QUEUE_DRIVER_LOW if setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            REG_QUEUE_DRIVER_HIGH if setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            REG_QUEUE_DEVICE_LOW if setup => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            REG_QUEUE_DEVICE_HIGH if setup => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            REG_QUEUE_NOTIFY if self.active => self.device.notify(v as u16),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => tracing::debug!(offset, value = v, "virtio-mmio: ignored register write"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue() {
            f(q);
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device.features() != 0 {
            // The driver accepted a feature we never offered.
            v &= !STATUS_FEATURES_OK;
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            tracing::warn!("virtio-mmio: queue {i} is not valid; the device stays stopped");
            self.status |= STATUS_FAILED;
            return;
        }
        // The device takes the queues; the transport keeps fresh ones that
        // only remember what the driver's reads of the registers show.
        let fresh = self
            .queues
            .iter()
            .filter_map(|q| {
                let mut n = Queue::new(q.max_size()).ok()?;
                n.set_size(q.size());
                n.set_ready(q.ready());
                Some(n)
            })
            .collect();
        let queues = std::mem::replace(&mut self.queues, fresh);
        match self.device.activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
            self.driver_features,
        ) {
            Ok(()) => {
                self.active = true;
                tracing::info!(
                    device = self.device.device_type(),
                    features = format_args!("{:#x}", self.driver_features),
                    "virtio device activated"
                );
            }
            Err(e) => {
                tracing::warn!("virtio-mmio: {e}");
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let v = if data.len() == 4 {
            self.read_reg(offset)
        } else {
            0
        };
        for (d, s) in data
            .iter_mut()
            .zip(v.to_le_bytes().iter().chain([0u8; 4].iter().cycle()))
        {
            *d = *s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        // Registers are 32 bits wide; the spec allows only 32-bit accesses.
        if let &[a, b, c, d] = data {
            self.write_reg(offset, u32::from_le_bytes([a, b, c, d]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioError;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Default)]
    struct Log {
        activated: Option<(usize, u64)>,
        notified: Vec<u16>,
        resets: usize,
    }

    struct Fake(Arc<Mutex<Log>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            (1 << 32) | (1 << 5)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6], offset, data);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            q: Vec<Queue>,
            _: Arc<Interrupt>,
            f: u64,
        ) -> Result<(), VirtioError> {
            self.0.lock().unwrap().activated = Some((q.len(), f));
            Ok(())
        }
        fn notify(&mut self, i: u16) {
            self.0.lock().unwrap().notified.push(i);
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn a_driver_brings_the_device_up_and_resets_it() {
        let mem = crate::vstate::memory::create_guest_memory(32 << 20)
            .unwrap()
            .mem;
        let log = Arc::new(Mutex::new(Log::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(Fake(log.clone())), mem, irq);
        assert_eq!((r(&mut t, REG_MAGIC), r(&mut t, REG_VERSION)), (MAGIC, 2));
        assert_eq!(r(&mut t, REG_DEVICE_ID), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        for (sel, base) in [(0u32, 0x10_0000u32), (1, 0x20_0000)] {
            w(&mut t, REG_QUEUE_SEL, sel);
            assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
            w(&mut t, REG_QUEUE_NUM, 256);
            w(&mut t, REG_QUEUE_DESC_LOW, base);
            w(&mut t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
            w(&mut t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
            w(&mut t, REG_QUEUE_READY, 1);
        }
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(log.lock().unwrap().notified.is_empty(), "not active yet");
        w(
            &mut t,
            REG_STATUS,
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(log.lock().unwrap().activated, Some((2, 1 << 32)));
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(log.lock().unwrap().notified, vec![1]);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_OFFSET + 4, &mut cfg);
        assert_eq!(cfg, [5, 6]);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn unoffered_features_are_refused() {
        let mem = crate::vstate::memory::create_guest_memory(32 << 20)
            .unwrap()
            .mem;
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(Fake(Arc::default())), mem, irq);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 7);
        w(&mut t, REG_STATUS, STATUS_FEATURES_OK);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }
}
