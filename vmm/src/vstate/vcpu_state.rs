//! Saving and restoring the complete state of a vCPU.
//!
//! One mechanism serves speculation checkpoints (in memory) and snapshots
//! on disk; the state's bytes are here too ([`Encode`], [`Decode`]).

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_sync_regs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::arch::x86_64::lapic::apic_enabled;
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};

/// MSR_IA32_TSC. Never restored on rollback: the guest's TSC must keep
/// running forward so its clock reads the present (SPECULATIONS.md, Time).
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSR_IA32_TSC_ADJUST, restored for the same reason as the TSC: not at all.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;

/// Errors saving or restoring vCPU state: the ioctl that failed.
#[derive(Debug, thiserror::Error)]
#[error("vCPU state: {0}: {1}")]
pub struct StateError(pub &'static str, pub kvm_ioctls::Error);

/// Which optional state this host's KVM can save, decided once per VM.
#[derive(Debug, Clone)]
pub struct StateCaps {
    /// KVM_GET/SET_XSAVE works (else KVM_GET/SET_FPU).
    pub xsave: bool,
    /// KVM_GET/SET_XCRS works.
    pub xcrs: bool,
    /// The MSRs that can be read on this host, in index order.
    pub msrs: Vec<u32>,
}

impl StateCaps {
    /// Probes the host: which state ioctls exist, and which of the MSRs in
    /// KVM_GET_MSR_INDEX_LIST can actually be read back on `vcpu` (some are
    /// listed but refuse reads).
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> Self {
        let xsave = kvm.check_extension(kvm_ioctls::Cap::Xsave) && vcpu.get_xsave().is_ok();
        let xcrs = kvm.check_extension(kvm_ioctls::Cap::Xcrs) && vcpu.get_xcrs().is_ok();
        let list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let msrs = readable_msrs(vcpu, &list);
        Self { xsave, xcrs, msrs }
    }
}

/// The MSRs of `list` that `vcpu` can read, in order. `KVM_GET_MSRS`
/// reads entries in order and stops at the first it cannot read, returning
/// how many it read: so each call reads the rest of the list, and an entry
/// it stops at is dropped. A host that reads every MSR costs one ioctl per
/// 64, not one per MSR (~40 ioctls of ~15 µs each, on every VM start and
/// restore, before).
fn readable_msrs(vcpu: &VcpuFd, list: &[u32]) -> Vec<u32> {
    let mut readable = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(64)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let read = Msrs::from_entries(&entries)
            .ok()
            .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
            .unwrap_or(0)
            .min(batch.len());
        readable.extend_from_slice(&batch[..read]);
        // Past what was read, and past the entry that refused, if one did.
        let next = if read == batch.len() { read } else { read + 1 };
        rest = &rest[next..];
    }
    readable
}

/// Per-ioctl timings of one save or restore, logged only when the
/// `specvm::vcpu_ioctls` trace target is on (`--log-level
/// specvm::vcpu_ioctls=trace`): how `docs/benchmarks/checkpoint.md`
/// measures each state ioctl. Off, it costs one check per save.
struct IoctlClock {
    last: Option<std::time::Instant>,
    times: Vec<(&'static str, u32)>,
}

impl IoctlClock {
    fn start() -> Self {
        let on = tracing::enabled!(target: "specvm::vcpu_ioctls", tracing::Level::TRACE);
        Self {
            last: on.then(std::time::Instant::now),
            times: Vec::new(),
        }
    }

    /// Notes the time since the last lap as `what`'s.
    fn lap(&mut self, what: &'static str) {
        if let Some(t) = self.last.as_mut() {
            self.times.push((what, t.elapsed().as_nanos() as u32));
            *t = std::time::Instant::now();
        }
    }

    fn report(self, op: &'static str) {
        if self.last.is_some() {
            let times: Vec<String> = self
                .times
                .iter()
                .map(|(w, ns)| format!("{w}={ns}"))
                .collect();
            tracing::trace!(target: "specvm::vcpu_ioctls", op, ns = times.join(" "), "vCPU state ioctls");
        }
    }
}

/// The complete state of one vCPU.
pub struct VcpuState {
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Extended FPU state, where the host supports it.
    pub xsave: Option<Box<kvm_xsave>>,
    /// Legacy FPU state, where XSAVE is unavailable.
    pub fpu: Option<kvm_fpu>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every readable MSR.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

/// What a save may take from `kvm_run`'s copy of the registers
/// (`KVM_CAP_SYNC_REGS`), which KVM made at the vCPU's last exit, instead
/// of an ioctl each. On this host every vCPU ioctl costs about 6 µs.
#[derive(Clone, Copy)]
pub enum Synced<'a> {
    /// Nothing: every part is read through its ioctl.
    None,
    /// REGS, SREGS and VCPU_EVENTS: a VM of one vCPU, where nothing can
    /// change them between the exit and the save (only another vCPU can
    /// send the INIT or SIPI that KVM_GET_MP_STATE takes in).
    All(&'a kvm_sync_regs),
    /// REGS and SREGS, in a VM of several vCPUs, unless the save's
    /// KVM_GET_MP_STATE took in an INIT or SIPI that another vCPU sent
    /// after the exit and so changed them. It did not if the local APIC
    /// read after it is software-enabled ([`apic_enabled`]): an INIT
    /// resets the spurious-vector register to 0xff, APIC disabled, and a
    /// vCPU that waits for a SIPI has had no chance to enable it since its
    /// INIT. Otherwise they are read through ioctls. VCPU_EVENTS always
    /// is: an NMI another vCPU sends after the exit is pending in KVM but
    /// not in the copy.
    Regs(&'a kvm_sync_regs),
}

/// Saves the state of `vcpu`, which must not be running.
///
/// The order follows KVM's api.rst: MP_STATE first, because reading it
/// makes KVM process pending APIC events (INIT, SIPI) into the state the
/// other reads see; VCPU_EVENTS last, so it captures any event that the
/// earlier reads left pending.
///
/// `synced` says which parts come from `kvm_run`'s copy instead of
/// ioctls. Debug builds read those through the ioctls too and fail the
/// save if the two differ.
pub fn save(vcpu: &VcpuFd, caps: &StateCaps, synced: Synced) -> Result<VcpuState, StateError> {
    let e = |what| move |err| StateError(what, err);
    let mut clk = IoctlClock::start();
    let mp_state = vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    clk.lap("KVM_GET_MP_STATE");
    let (xsave, fpu) = if caps.xsave {
        (
            Some(Box::new(vcpu.get_xsave().map_err(e("KVM_GET_XSAVE"))?)),
            None,
        )
    } else {
        (None, Some(vcpu.get_fpu().map_err(e("KVM_GET_FPU"))?))
    };
    clk.lap("KVM_GET_XSAVE/FPU");
    let xcrs = if caps.xcrs {
        Some(vcpu.get_xcrs().map_err(e("KVM_GET_XCRS"))?)
    } else {
        None
    };
    clk.lap("KVM_GET_XCRS");
    let debugregs = vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    clk.lap("KVM_GET_DEBUGREGS");
    let lapic = vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    clk.lap("KVM_GET_LAPIC");
    let copy = match synced {
        Synced::All(s) => Some(s),
        Synced::Regs(s) if apic_enabled(&lapic) => Some(s),
        _ => None,
    };
    let (regs, sregs) = match copy {
        Some(s) => {
            check_synced(vcpu, s)?;
            (s.regs, s.sregs)
        }
        None => {
            let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
            clk.lap("KVM_GET_REGS");
            (regs, vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?)
        }
    };
    clk.lap("KVM_GET_SREGS");
    let msrs = save_msrs(vcpu, &caps.msrs)?;
    clk.lap("KVM_GET_MSRS");
    let events = match synced {
        Synced::All(s) => s.events,
        _ => vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
    };
    if let Synced::All(s) = synced {
        check_synced_events(vcpu, s)?;
    }
    clk.lap("KVM_GET_VCPU_EVENTS");
    clk.report("save");
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

/// In debug builds: reads REGS and SREGS through their ioctls and fails
/// unless `synced` holds the same (the integration tests run debug
/// builds, so every save they make checks the synced copy).
fn check_synced(vcpu: &VcpuFd, synced: &kvm_sync_regs) -> Result<(), StateError> {
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    let e = |what| move |err| StateError(what, err);
    let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    if regs != synced.regs || sregs != synced.sregs {
        return Err(differ());
    }
    Ok(())
}

/// The same for VCPU_EVENTS.
fn check_synced_events(vcpu: &VcpuFd, synced: &kvm_sync_regs) -> Result<(), StateError> {
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    let events = vcpu
        .get_vcpu_events()
        .map_err(|err| StateError("KVM_GET_VCPU_EVENTS", err))?;
    if events != synced.events {
        return Err(differ());
    }
    Ok(())
}

fn differ() -> StateError {
    StateError(
        "the synced registers differ from KVM's",
        kvm_ioctls::Error::new(libc::EIO),
    )
}

fn save_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    // The FAM wrapper holds at most a few hundred entries; KVM's list is ~40.
    let mut out = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(64) {
        let mut m = Msrs::from_entries(chunk).map_err(|_| {
            StateError("building the MSR list", kvm_ioctls::Error::new(libc::E2BIG))
        })?;
        let n = vcpu
            .get_msrs(&mut m)
            .map_err(|err| StateError("KVM_GET_MSRS", err))?;
        out.extend_from_slice(&m.as_slice()[..n]);
    }
    Ok(out)
}

/// Which parts of a restored state wait in `kvm_run` for the next KVM_RUN
/// instead of being written by [`restore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// None: every part is written through its ioctl.
    Nothing,
    /// REGS.
    Regs,
    /// REGS and VCPU_EVENTS.
    RegsAndEvents,
}

/// Restores `state` on `vcpu`, which must not be running.
///
/// The order matters:
/// - MP_STATE first, so a vCPU that was halted or waiting for SIPI is
///   back in that state before its registers are written;
/// - SREGS before LAPIC: SREGS carries the APIC base, and KVM resets the
///   local APIC's mode from it;
/// - LAPIC before MSRs: writing the LAPIC state clears the TSC-deadline
///   timer, which the MSR write (IA32_TSC_DEADLINE) then sets again;
/// - VCPU_EVENTS last: the earlier writes may clear pending exceptions
///   and interrupts, which this puts back.
///
/// The TSC MSRs are skipped, so the guest's time keeps moving forward.
///
/// What `deferred` names is not written here: the caller puts it in
/// `kvm_run` for KVM to load at the next KVM_RUN (`KVM_CAP_SYNC_REGS`), an
/// ioctl fewer each. KVM loads REGS then VCPU_EVENTS, after everything
/// written here, so VCPU_EVENTS still comes last; REGS then follows SREGS,
/// LAPIC and MSRs, none of which depends on it.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState, deferred: Deferred) -> Result<(), StateError> {
    let sync_regs = deferred != Deferred::Nothing;
    let sync_events = deferred == Deferred::RegsAndEvents;
    let e = |what| move |err| StateError(what, err);
    let mut clk = IoctlClock::start();
    vcpu.set_mp_state(state.mp_state)
        .map_err(e("KVM_SET_MP_STATE"))?;
    clk.lap("KVM_SET_MP_STATE");
    if !sync_regs {
        vcpu.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
        clk.lap("KVM_SET_REGS");
    }
    vcpu.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    clk.lap("KVM_SET_SREGS");
    if let Some(x) = &state.xsave {
        // SAFETY: the buffer came from KVM_GET_XSAVE on a vCPU of this VM
        // with the same CPUID, so its enabled state fits the 4 KiB struct.
        unsafe { vcpu.set_xsave(x) }.map_err(e("KVM_SET_XSAVE"))?;
        clk.lap("KVM_SET_XSAVE");
    }
    if let Some(f) = &state.fpu {
        vcpu.set_fpu(f).map_err(e("KVM_SET_FPU"))?;
        clk.lap("KVM_SET_FPU");
    }
    if let Some(x) = &state.xcrs {
        vcpu.set_xcrs(x).map_err(e("KVM_SET_XCRS"))?;
        clk.lap("KVM_SET_XCRS");
    }
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    clk.lap("KVM_SET_DEBUGREGS");
    vcpu.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
    clk.lap("KVM_SET_LAPIC");
    let msrs: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .filter(|m| m.index != MSR_IA32_TSC && m.index != MSR_IA32_TSC_ADJUST)
        .copied()
        .collect();
    for chunk in msrs.chunks(64) {
        let m = Msrs::from_entries(chunk).map_err(|_| {
            StateError("building the MSR list", kvm_ioctls::Error::new(libc::E2BIG))
        })?;
        let n = vcpu.set_msrs(&m).map_err(e("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError(
                "KVM_SET_MSRS (partial write)",
                kvm_ioctls::Error::new(libc::EINVAL),
            ));
        }
    }
    clk.lap("KVM_SET_MSRS");
    if !sync_events {
        vcpu.set_vcpu_events(&state.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        clk.lap("KVM_SET_VCPU_EVENTS");
    }
    clk.report("restore");
    Ok(())
}

impl Encode for VcpuState {
    /// The registers in the order [`save`] reads them; the optional parts
    /// behind a presence flag; the MSRs as a count and entries.
    fn encode(&self, w: &mut Writer) {
        w.pod(&self.mp_state);
        w.pod(&self.regs);
        w.pod(&self.sregs);
        w.bool(self.xsave.is_some());
        if let Some(x) = &self.xsave {
            w.pod(x.as_ref());
        }
        w.bool(self.fpu.is_some());
        if let Some(f) = &self.fpu {
            put_fpu(w, f);
        }
        w.bool(self.xcrs.is_some());
        if let Some(x) = &self.xcrs {
            w.pod(x);
        }
        w.pod(&self.debugregs);
        w.pod(&self.lapic);
        w.u32(self.msrs.len() as u32);
        for m in &self.msrs {
            w.pod(m);
        }
        w.pod(&self.events);
    }
}

impl Decode for VcpuState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
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

fn get_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu, DecodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// In a VM of several vCPUs a save takes REGS and SREGS from the copy
    /// KVM made at the exit, unless its own KVM_GET_MP_STATE took in an
    /// INIT that came after the exit: then the copy is stale, and the save
    /// reads what the INIT left. (The INIT is latched through
    /// KVM_SET_VCPU_EVENTS, as if another vCPU had sent it.)
    #[test]
    fn a_save_reads_the_registers_an_init_left_not_the_copy_from_before() {
        let test = "a_save_reads_the_registers_an_init_left_not_the_copy_from_before";
        let Some((kvm, _vm, vcpu)) = crate::test_util::kvm_vcpu_or_skip(test) else {
            return;
        };
        let caps = StateCaps::probe(&kvm, &vcpu);
        let mut regs = vcpu.get_regs().unwrap();
        (regs.rip, regs.rax, regs.rflags) = (0x1234, 0x42, 0x2);
        vcpu.set_regs(&regs).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[0xf1] |= 1; // SVR bit 8: software-enabled
        vcpu.set_lapic(&lapic).unwrap();
        let copy = kvm_sync_regs {
            regs: vcpu.get_regs().unwrap(),
            sregs: vcpu.get_sregs().unwrap(),
            events: vcpu.get_vcpu_events().unwrap(),
        };
        // No INIT: the copy is taken (debug builds check it against KVM).
        let s = save(&vcpu, &caps, Synced::Regs(&copy)).expect("a save with no INIT");
        assert!(apic_enabled(&s.lapic));
        assert_eq!((s.regs.rip, s.regs.rax), (0x1234, 0x42));

        let mut ev = vcpu.get_vcpu_events().unwrap();
        ev.flags = kvm_bindings::KVM_VCPUEVENT_VALID_SMM;
        ev.smi.latched_init = 1;
        vcpu.set_vcpu_events(&ev).expect("latching an INIT");
        let s = save(&vcpu, &caps, Synced::Regs(&copy)).expect("a save that takes in the INIT");
        assert!(!apic_enabled(&s.lapic), "INIT left the APIC enabled");
        assert_eq!(s.regs.rip, 0xfff0, "the registers after INIT");
        assert_eq!(s.sregs.cs.base, 0xffff_0000);
        assert_eq!(s.regs, vcpu.get_regs().unwrap());
    }

    /// Reading the MSR list in batches finds exactly the MSRs that reading
    /// them one at a time finds, keeps the order, and drops an index KVM
    /// refuses without losing the ones after it.
    #[test]
    fn batched_msr_probe_matches_one_at_a_time() {
        let test = "batched_msr_probe_matches_one_at_a_time";
        let Some((kvm, _vm, vcpu)) = crate::test_util::kvm_vcpu_or_skip(test) else {
            return;
        };
        let known = kvm
            .get_msr_index_list()
            .expect("the MSR list")
            .as_slice()
            .to_vec();
        assert!(known.len() > 2, "KVM lists {} MSRs", known.len());
        // An index no CPU has, in the middle and at the end; the list nine
        // times over, so it spans more than one batch of 64.
        const BOGUS: u32 = 0x7fff_0001;
        let mid = known.len() / 2;
        let mut list = known.clone();
        list.insert(mid, BOGUS);
        for _ in 0..8 {
            list.extend_from_slice(&known);
        }
        list.push(BOGUS);
        assert!(list.len() > 64);
        let one_by_one: Vec<u32> = list
            .iter()
            .copied()
            .filter(|&index| {
                let mut m = Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }])
                .unwrap();
                matches!(vcpu.get_msrs(&mut m), Ok(1))
            })
            .collect();
        let batched = readable_msrs(&vcpu, &list);
        assert!(!one_by_one.contains(&BOGUS), "KVM read MSR {BOGUS:#x}");
        assert_eq!(batched, one_by_one);
        assert!(
            batched.len() > 64,
            "only {} MSRs readable, so one batch",
            batched.len()
        );
    }
}
