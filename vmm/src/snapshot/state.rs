//! Encoding of the machine state that speculation checkpoints also save:
//! [`VcpuState`], [`VmState`] and every [`DeviceState`]; and of the
//! host-compat [`TrampolineState`]. The structures are their owners'; this
//! file only turns them into bytes and back.

use kvm_bindings::kvm_fpu;
use virtio_queue::QueueState;
use vm_superio::serial::SerialState;

use super::codec::{Reader, Writer};
use super::SnapshotError;
use crate::devices::bus::DeviceState;
use crate::devices::virtio::{NetState, QueueRegs, SavedQueue, TransportState};
use crate::host_compat::trampoline::TrampolineState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

/// Tags of [`DeviceState`] variants in the file.
const DEV_STATELESS: u8 = 0;
const DEV_SERIAL: u8 = 1;
const DEV_NET: u8 = 2;

/// Appends the system-call trampoline's state, if any: a presence flag,
/// then the kernel's LSTAR, STAR and SFMASK.
pub fn put_trampoline(w: &mut Writer, t: Option<&TrampolineState>) {
    w.bool(t.is_some());
    if let Some(t) = t {
        w.u64(t.kernel_lstar);
        w.u64(t.star);
        w.u64(t.sfmask);
    }
}

/// Reads what [`put_trampoline`] wrote.
pub fn get_trampoline(r: &mut Reader<'_>) -> Result<Option<TrampolineState>, SnapshotError> {
    if !r.bool("has trampoline state")? {
        return Ok(None);
    }
    Ok(Some(TrampolineState {
        kernel_lstar: r.u64("trampoline kernel LSTAR")?,
        star: r.u64("trampoline STAR")?,
        sfmask: r.u64("trampoline SFMASK")?,
    }))
}

/// Appends one vCPU's state.
pub fn put_vcpu(w: &mut Writer, s: &VcpuState) {
    w.pod(&s.mp_state);
    w.pod(&s.regs);
    w.pod(&s.sregs);
    w.bool(s.xsave.is_some());
    if let Some(x) = &s.xsave {
        w.pod(x.as_ref());
    }
    w.bool(s.fpu.is_some());
    if let Some(f) = &s.fpu {
        put_fpu(w, f);
    }
    w.bool(s.xcrs.is_some());
    if let Some(x) = &s.xcrs {
        w.pod(x);
    }
    w.pod(&s.debugregs);
    w.pod(&s.lapic);
    w.u32(s.msrs.len() as u32);
    for m in &s.msrs {
        w.pod(m);
    }
    w.pod(&s.events);
}

/// Reads one vCPU's state.
pub fn get_vcpu(r: &mut Reader<'_>) -> Result<VcpuState, SnapshotError> {
    let mp_state = r.pod("vCPU MP_STATE")?;
    let regs = r.pod("vCPU REGS")?;
    let sregs = r.pod("vCPU SREGS")?;
    let xsave = match r.bool("vCPU has XSAVE")? {
        true => Some(Box::new(r.pod("vCPU XSAVE")?)),
        false => None,
    };
    let fpu = match r.bool("vCPU has FPU")? {
        true => Some(get_fpu(r)?),
        false => None,
    };
    let xcrs = match r.bool("vCPU has XCRS")? {
        true => Some(r.pod("vCPU XCRS")?),
        false => None,
    };
    let debugregs = r.pod("vCPU DEBUGREGS")?;
    let lapic = r.pod("vCPU LAPIC")?;
    let n = r.count(4, "vCPU MSR count")?;
    let msrs = (0..n)
        .map(|_| r.pod("vCPU MSR"))
        .collect::<Result<_, _>>()?;
    let events = r.pod("vCPU EVENTS")?;
    Ok(VcpuState {
        mp_state,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// kvm-bindings derives no byte view for `kvm_fpu` (only hosts without
/// XSAVE use it), so it goes field by field.
fn put_fpu(w: &mut Writer, f: &kvm_fpu) {
    f.fpr.iter().for_each(|x| w.buf.extend_from_slice(x));
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    f.xmm.iter().for_each(|x| w.buf.extend_from_slice(x));
    w.u32(f.mxcsr);
}

fn get_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu, SnapshotError> {
    let mut f = kvm_fpu::default();
    for x in f.fpr.iter_mut() {
        x.copy_from_slice(r.take(16, "FPU register")?);
    }
    f.fcw = r.u16("FPU fcw")?;
    f.fsw = r.u16("FPU fsw")?;
    f.ftwx = r.u8("FPU ftwx")?;
    f.last_opcode = r.u16("FPU opcode")?;
    f.last_ip = r.u64("FPU ip")?;
    f.last_dp = r.u64("FPU dp")?;
    for x in f.xmm.iter_mut() {
        x.copy_from_slice(r.take(16, "XMM register")?);
    }
    f.mxcsr = r.u32("FPU mxcsr")?;
    Ok(f)
}

/// Appends the VM's in-kernel device state.
pub fn put_vm(w: &mut Writer, s: &VmState) {
    s.irqchips.iter().for_each(|c| w.pod(c));
    w.pod(&s.pit);
    w.pod(&s.clock);
}

/// Reads the VM's in-kernel device state.
pub fn get_vm(r: &mut Reader<'_>) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        irqchips: [r.pod("PIC master")?, r.pod("PIC slave")?, r.pod("IOAPIC")?],
        pit: r.pod("PIT")?,
        clock: r.pod("KVM clock")?,
    })
}

/// Appends a device model's state.
pub fn put_device(w: &mut Writer, s: &DeviceState) {
    match s {
        DeviceState::Stateless => w.u8(DEV_STATELESS),
        DeviceState::Serial(s) => {
            w.u8(DEV_SERIAL);
            for b in [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ] {
                w.u8(b);
            }
            w.bytes(&s.in_buffer);
        }
        DeviceState::Net(n) => {
            w.u8(DEV_NET);
            put_net(w, n);
        }
    }
}

/// Reads a device model's state.
pub fn get_device(r: &mut Reader<'_>) -> Result<DeviceState, SnapshotError> {
    match r.u8("device kind")? {
        DEV_STATELESS => Ok(DeviceState::Stateless),
        DEV_SERIAL => {
            let mut b = [0u8; 9];
            b.copy_from_slice(r.take(9, "serial registers")?);
            Ok(DeviceState::Serial(SerialState {
                baud_divisor_low: b[0],
                baud_divisor_high: b[1],
                interrupt_enable: b[2],
                interrupt_identification: b[3],
                line_control: b[4],
                line_status: b[5],
                modem_control: b[6],
                modem_status: b[7],
                scratch: b[8],
                in_buffer: r.bytes("serial input")?.to_vec(),
            }))
        }
        DEV_NET => Ok(DeviceState::Net(Box::new(get_net(r)?))),
        k => Err(SnapshotError::Corrupt(format!("unknown device kind {k}"))),
    }
}

fn put_net(w: &mut Writer, n: &NetState) {
    let t = &n.transport;
    for v in [
        t.status,
        t.device_features_sel,
        t.driver_features_sel,
        t.queue_sel,
        t.interrupt_status,
        t.config_generation,
    ] {
        w.u32(v);
    }
    w.u64(t.driver_features);
    w.u32(t.queues.len() as u32);
    for q in &t.queues {
        w.u32(q.regs.num);
        w.u64(q.regs.desc);
        w.u64(q.regs.driver);
        w.u64(q.regs.device);
        let s = &q.queue;
        for v in [s.max_size, s.next_avail, s.next_used, s.size] {
            w.u16(v);
        }
        w.bool(s.event_idx_enabled);
        w.bool(s.ready);
        for v in [s.desc_table, s.avail_ring, s.used_ring] {
            w.u64(v);
        }
    }
    w.buf.extend_from_slice(&n.mac);
    w.u16(n.mtu);
}

fn get_net(r: &mut Reader<'_>) -> Result<NetState, SnapshotError> {
    let mut v = [0u32; 6];
    for x in v.iter_mut() {
        *x = r.u32("virtio transport register")?;
    }
    let driver_features = r.u64("virtio driver features")?;
    let n = r.count(60, "virtio queue count")?;
    let mut queues = Vec::with_capacity(n);
    for _ in 0..n {
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
        queues.push(SavedQueue { regs, queue });
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(r.take(6, "MAC")?);
    Ok(NetState {
        transport: TransportState {
            status: v[0],
            device_features_sel: v[1],
            driver_features_sel: v[2],
            driver_features,
            queue_sel: v[3],
            interrupt_status: v[4],
            config_generation: v[5],
            queues,
        },
        mac,
        mtu: r.u16("MTU")?,
    })
}
