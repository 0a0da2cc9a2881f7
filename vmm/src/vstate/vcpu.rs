//! vCPUs and the loop each one runs on its own thread.
//!
//! The loop is the one place exits are dispatched: port and MMIO accesses go
//! to their bus, platform events to the main thread, and emulation failures
//! to the host-compat layer when it is active.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMemoryMmap;
use super::vcpu_state::{self, StateCaps};
use crate::devices::{Bus, VcpuTrap, WriteResult};
use crate::event::{EventSender, VcpuCmd, VcpuReply, VmEvent};
use crate::host_compat::{self, HostCompat};
use crate::persist::Persist;
use crate::progress::Progress;
use crate::snapshot::verify::MemoryChecked;

/// KVM_INTERNAL_ERROR_EMULATION: the instruction emulator gave up.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// Set in the emulation-failure flags when the instruction bytes follow.
const EMULATION_FLAG_INSN_BYTES: u64 = 1;

/// What the vCPU threads share with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where VM-wide events go.
    pub events: EventSender,
    /// Set by the main thread when every vCPU must stop.
    pub stop: Arc<AtomicBool>,
    /// The host-compat layer, when active.
    pub compat: Option<HostCompat>,
    /// Guest memory, to read instruction bytes for error reports.
    pub mem: GuestMemoryMmap,
    /// Exit counts and RIP samples for progress reports.
    pub progress: Arc<Progress>,
    /// The VM's dirty rings, when it has them: a vCPU whose ring fills
    /// empties it here.
    pub dirty_rings: Option<Arc<super::dirty::DirtyRings>>,
    /// Whether a restored VM's memory is known good; until it is, with
    /// `--verify before-output`, a write that leaves the VM waits
    /// ([`hold_output`]).
    pub checked: Arc<MemoryChecked>,
}

/// One vCPU.
pub struct Vcpu {
    /// The KVM vCPU file descriptor.
    pub fd: VcpuFd,
    /// Its index, which is also its APIC ID.
    pub index: u8,
    /// Which state this host's KVM can save.
    pub caps: Arc<StateCaps>,
    /// How much of the state passes through `kvm_run` instead of ioctls
    /// (`KVM_CAP_SYNC_REGS`, turned on by [`Vcpu::use_sync_regs`]).
    pub sync_regs: SyncRegs,
    /// Whether `kvm_run`'s copy is current: set by each return from
    /// KVM_RUN, cleared by every write of the state through an ioctl (and,
    /// with [`SyncRegs::ManyVcpus`], by every save: see there).
    pub sync_fresh: bool,
    /// Which of REGS and VCPU_EVENTS were written into `kvm_run` for KVM
    /// to load at the next KVM_RUN (`KVM_SYNC_X86_*` bits: a rollback's or
    /// a hypercall result's, see [`Vcpu::load_synced`]); until then
    /// `kvm_run` holds the truth for them.
    pub sync_pending: u64,
    /// Whether the last KVM_RUN returned an exit, which KVM may still
    /// have to complete (a port or MMIO read's data) at the next KVM_RUN.
    /// After a return by a signal (`EINTR`, how a kicked vCPU comes out)
    /// KVM has completed everything, so a park needs no extra KVM_RUN.
    pub completion_due: bool,
}

impl crate::persist::Persist for Vcpu {
    type State = vcpu_state::VcpuState;
    type Error = vcpu_state::StateError;

    /// The complete state (see [`vcpu_state::save`] for the order).
    /// Registers still waiting in `kvm_run` are loaded first. A parked
    /// vCPU saves through [`Vcpu::save_parked`], which also takes them out
    /// of `kvm_run`.
    fn save(&self) -> Result<Self::State, Self::Error> {
        // Left in `kvm_run` (a `&self` save cannot take them out), KVM
        // loads the same values again at the next KVM_RUN: harmless with
        // one vCPU, where no INIT can come in between and change them (see
        // `SyncRegs::ManyVcpus`).
        self.write_pending()?;
        // Copied out of `kvm_run` only when a save may use it.
        let copy =
            (self.sync_fresh && self.sync_regs != SyncRegs::Off).then(|| self.fd.sync_regs());
        let synced = match (self.sync_regs, &copy) {
            (SyncRegs::OneVcpu, Some(c)) => vcpu_state::Synced::All(c),
            (SyncRegs::ManyVcpus, Some(c)) => vcpu_state::Synced::Regs(c),
            _ => vcpu_state::Synced::None,
        };
        vcpu_state::save(&self.fd, &self.caps, synced)
    }

    /// Everything but the TSC (see [`vcpu_state::restore`]). Where KVM
    /// offers it, REGS go through `kvm_run`, and VCPU_EVENTS too with one
    /// vCPU (see [`SyncRegs`] for why not with more).
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        use vcpu_state::Deferred;
        self.sync_fresh = false;
        let deferred = match self.sync_regs {
            SyncRegs::Off => Deferred::Nothing,
            // KVM's load of REGS drops a pending exception, which the
            // earlier write of VCPU_EVENTS would have put back. KVM reports
            // none as pending unless KVM_CAP_EXCEPTION_PAYLOAD is on (it is
            // not), but a state that has one is not deferred.
            SyncRegs::ManyVcpus if state.events.exception.pending != 0 => Deferred::Nothing,
            SyncRegs::ManyVcpus => Deferred::Regs,
            SyncRegs::OneVcpu => Deferred::RegsAndEvents,
        };
        vcpu_state::restore(&self.fd, state, deferred)?;
        match deferred {
            Deferred::Nothing => {}
            Deferred::Regs => self.load_synced(Some(&state.regs), None),
            Deferred::RegsAndEvents => self.load_synced(Some(&state.regs), Some(&state.events)),
        }
        Ok(())
    }
}

/// How much of a vCPU's state passes through `kvm_run` instead of ioctls
/// (`KVM_CAP_SYNC_REGS`). On this host every vCPU state ioctl costs about
/// 6 µs, whatever it moves (docs/benchmarks/checkpoint.md), so each one
/// left out counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRegs {
    /// Every read and write of the state is an ioctl (KVM without the
    /// capability, or `SPECVM_NO_SYNC_REGS`).
    Off,
    /// A VM of several vCPUs. KVM copies REGS and SREGS into `kvm_run` at
    /// every exit: a hypercall's argument is read there, and a save takes
    /// both from there unless its KVM_GET_MP_STATE took in an INIT or SIPI
    /// (`vcpu_state::Synced::Regs` tells how). REGS written there (a
    /// hypercall's result, a rollback's) are loaded at the next KVM_RUN.
    /// VCPU_EVENTS are not: KVM's write of them also sets or clears a
    /// latched INIT, so a late load would drop an INIT another vCPU sent
    /// after the rollback. That is safe with an INIT or SIPI from another
    /// vCPU on the way:
    /// - nothing changes a vCPU's registers between its exit and the next
    ///   ioctl on it but KVM_GET_MP_STATE, which takes in such an event.
    ///   Only a save makes that ioctl, and after a save the copy counts as
    ///   stale;
    /// - KVM loads what waits in `kvm_run` at the start of KVM_RUN, before
    ///   it takes in pending APIC events: an INIT that came in meanwhile
    ///   acts after the write, as it would after the same write through
    ///   an ioctl. A save, the one place that takes in events outside
    ///   KVM_RUN, first writes what waits through ioctls and takes it out
    ///   of `kvm_run` ([`Vcpu::save_parked`]), so KVM never loads it
    ///   again over what the INIT did.
    ManyVcpus,
    /// A VM of one vCPU: as `ManyVcpus`, and VCPU_EVENTS go through
    /// `kvm_run` both ways too: a save takes all three from there, and a
    /// rollback's VCPU_EVENTS load at the next KVM_RUN (no other vCPU can
    /// send an INIT, a SIPI or an NMI after the exit).
    OneVcpu,
}

impl Vcpu {
    /// vCPU `index` (also its APIC ID) on `fd`, every part of its state
    /// through ioctls until [`Vcpu::use_sync_regs`].
    pub fn new(fd: VcpuFd, index: u8, caps: Arc<StateCaps>) -> Self {
        Self {
            fd,
            index,
            caps,
            sync_regs: SyncRegs::Off,
            sync_fresh: false,
            sync_pending: 0,
            completion_due: false,
        }
    }

    /// Has KVM copy the registers `mode` names into `kvm_run` at every
    /// exit (see [`SyncRegs`] for which mode suits which VM).
    pub fn use_sync_regs(&mut self, mode: SyncRegs) {
        if mode != SyncRegs::Off {
            self.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            self.fd
                .set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        if mode == SyncRegs::OneVcpu {
            self.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::VcpuEvents);
        }
        self.sync_regs = mode;
    }

    /// Has KVM load `regs` and `events` from `kvm_run` at the next
    /// KVM_RUN (`KVM_CAP_SYNC_REGS`), instead of an ioctl each now (see
    /// [`SyncRegs::ManyVcpus`] for why that is safe).
    fn load_synced(
        &mut self,
        regs: Option<&kvm_bindings::kvm_regs>,
        events: Option<&kvm_bindings::kvm_vcpu_events>,
    ) {
        debug_assert!(self.sync_regs != SyncRegs::Off);
        if let Some(r) = regs {
            self.fd.sync_regs_mut().regs = *r;
            self.fd.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
        }
        if let Some(e) = events {
            self.fd.sync_regs_mut().events = *e;
            self.fd.set_sync_dirty_reg(kvm_ioctls::SyncReg::VcpuEvents);
        }
        self.sync_pending = self.fd.get_kvm_run().kvm_dirty_regs;
    }

    /// Whether registers still wait in `kvm_run`: KVM clears each bit as
    /// it loads them at a KVM_RUN.
    fn refresh_pending(&mut self) {
        if self.sync_pending != 0 {
            self.sync_pending = self.fd.get_kvm_run().kvm_dirty_regs;
        }
    }

    /// Writes through ioctls the registers that wait in `kvm_run` for the
    /// next KVM_RUN, so that KVM holds them now.
    fn write_pending(&self) -> Result<(), vcpu_state::StateError> {
        if self.sync_pending == 0 {
            return Ok(());
        }
        let s = self.fd.sync_regs();
        if self.sync_pending & kvm_bindings::KVM_SYNC_X86_REGS as u64 != 0 {
            self.fd
                .set_regs(&s.regs)
                .map_err(|e| vcpu_state::StateError("KVM_SET_REGS", e))?;
        }
        if self.sync_pending & kvm_bindings::KVM_SYNC_X86_EVENTS as u64 != 0 {
            self.fd
                .set_vcpu_events(&s.events)
                .map_err(|e| vcpu_state::StateError("KVM_SET_VCPU_EVENTS", e))?;
        }
        Ok(())
    }

    /// Saves the state of this parked vCPU. Registers waiting in `kvm_run`
    /// are written through ioctls first and taken out of it, so KVM does not
    /// load them a second time at the next KVM_RUN: with more vCPUs, the
    /// save's KVM_GET_MP_STATE may take in an INIT that changes them, and a
    /// second load would undo it ([`SyncRegs::ManyVcpus`]).
    fn save_parked(&mut self) -> Result<vcpu_state::VcpuState, vcpu_state::StateError> {
        self.write_pending()?;
        self.fd.get_kvm_run().kvm_dirty_regs = 0;
        self.sync_pending = 0;
        let s = self.save();
        if self.sync_regs == SyncRegs::ManyVcpus {
            self.sync_fresh = false;
        }
        s
    }

    /// Restores `state`, then, with `tsc_advance_ns`, the TSC moved forward
    /// by that time ([`crate::machine::restore`] decides which).
    pub fn restore_with_tsc(
        &mut self,
        state: &vcpu_state::VcpuState,
        tsc_advance_ns: Option<u64>,
    ) -> Result<(), vcpu_state::StateError> {
        self.restore(state)?;
        let Some(ns) = tsc_advance_ns else {
            return Ok(());
        };
        crate::machine::advance_tsc(&self.fd, state, ns)?;
        // The guest's clocks jumped by the time the snapshot waited.
        self.clock_paused();
        Ok(())
    }

    /// Tells the guest's kvmclock that the host stopped this vCPU
    /// (KVM_KVMCLOCK_CTRL, as QEMU does when it resumes a stopped VM):
    /// Linux's RCU stall and soft-lockup detectors then take the jump of
    /// its clocks for a pause, not a stall, and print no stall report.
    /// EINVAL: the guest never set up kvmclock (a bare guest), so there is
    /// no one to tell. Any other failure costs only that report, so it is
    /// logged and the VM goes on.
    fn clock_paused(&self) {
        match self.fd.kvmclock_ctrl() {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(e) => tracing::warn!(vcpu = self.index, "KVM_KVMCLOCK_CTRL: {e}"),
        }
    }
}

/// A request for a vCPU to park, set by the controller before it kicks
/// the vCPU out of KVM_RUN, and taken by the vCPU at its next turn of the
/// loop. A request to park *and save* makes the vCPU save its state as it
/// parks ([`VcpuReply::ParkedSaved`]), on its own thread, while the
/// controller goes on (with a checkpoint's memory step): a `Save` command
/// after the park would cost one more round trip between the two threads.
#[derive(Debug, Default)]
pub struct Attention(AtomicU8);

impl Attention {
    const NONE: u8 = 0;
    const PARK: u8 = 1;
    const PARK_AND_SAVE: u8 = 2;

    /// Asks the vCPU to park, and to save its state on the way if `save`.
    /// A request to save is never weakened by a later one to only park.
    pub fn request(&self, save: bool) {
        let want = if save {
            Self::PARK_AND_SAVE
        } else {
            Self::PARK
        };
        self.0.fetch_max(want, Ordering::AcqRel);
    }

    /// Takes the request: `None` when there is none, else whether to save.
    pub fn take(&self) -> Option<bool> {
        match self.0.swap(Self::NONE, Ordering::AcqRel) {
            Self::NONE => None,
            r => Some(r == Self::PARK_AND_SAVE),
        }
    }
}

/// The vCPU thread's end of its link to the controller: a channel each
/// way of its own, so the controller never sorts one vCPU's answers out of
/// the VM's event stream.
pub struct VcpuLink {
    /// Commands while parked.
    pub cmds: Receiver<VcpuCmd>,
    /// Answers: that the vCPU parked, and the result of each command.
    pub replies: Sender<VcpuReply>,
    /// Set by the controller (then a kick) to make the vCPU park.
    pub attention: Arc<Attention>,
    /// The hypercall the vCPU waits on, posted before it reports it.
    pub call: Arc<CallSlot>,
}

/// A vCPU's hypercall, as the controller may need it before its event
/// arrives: posted by the vCPU before it reports the call, marked served
/// by the controller. While a call waits the vCPU stays parked, whatever
/// else the controller resumes. A checkpoint taken meanwhile keeps the
/// call (its op and argument), so that a rollback there serves it again
/// (`crate::controller::vcpus::VcpuSet::after_rollback`).
#[derive(Debug, Default)]
pub struct CallSlot {
    pending: AtomicBool,
    op: AtomicU32,
    arg: AtomicU64,
    /// How many calls the vCPU has reported: the controller compares it
    /// with how many events it has read, to know whether one is on its way.
    made: AtomicU64,
}

impl CallSlot {
    /// The vCPU's side: a call is made; its event follows.
    pub fn post(&self, op: u32, arg: u64) {
        self.op.store(op, Ordering::Relaxed);
        self.arg.store(arg, Ordering::Relaxed);
        self.made.fetch_add(1, Ordering::Relaxed);
        self.pending.store(true, Ordering::Release);
    }

    /// Whether a call waits.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// The controller's side: marks the call served, or dropped.
    pub fn set_pending(&self, pending: bool) {
        self.pending.store(pending, Ordering::Release);
    }

    /// The controller's side: a rollback put the vCPU back to waiting on
    /// this earlier call (no event is sent for it).
    pub fn put_back(&self, op: u32, arg: u64) {
        self.op.store(op, Ordering::Relaxed);
        self.arg.store(arg, Ordering::Relaxed);
        self.pending.store(true, Ordering::Release);
    }

    /// The waiting call's op and argument (meaningful while one waits).
    pub fn call(&self) -> (u32, u64) {
        (
            self.op.load(Ordering::Relaxed),
            self.arg.load(Ordering::Relaxed),
        )
    }

    /// How many calls the vCPU has reported.
    pub fn made(&self) -> u64 {
        self.made.load(Ordering::Acquire)
    }
}

/// What the loop does after an exit.
enum Next {
    Continue,
    /// A speculation hypercall: report it, then park until it is served.
    Hypercall(u32, u64),
    Stop,
    /// The host-compat trampoline must carry the vCPU into the kernel.
    SyscallEntry,
}

/// Exits that need the vCPU again after the `kvm_run` borrow ends.
enum Deferred {
    Shutdown,
    InternalError,
    Fatal(String),
    /// A filtered MSR write, for the host-compat layer: index and value.
    Wrmsr(u32, u64),
}

impl Vcpu {
    /// Runs the vCPU until the VM stops or this vCPU fails. Failures are sent
    /// as [`VmEvent::Fatal`], never panicked.
    pub fn run(mut self, ctx: VcpuContext, link: VcpuLink) {
        while !ctx.stop.load(Ordering::Acquire) {
            let step = match link.attention.take() {
                Some(save) => self.park_with(&ctx, &link, save),
                None => self.run_once(&ctx),
            };
            let step = match step {
                Ok(Next::Hypercall(op, arg)) => {
                    link.call.post(op, arg);
                    let call = VmEvent::Hypercall {
                        vcpu: self.index,
                        op,
                        arg,
                    };
                    // A speculate is answered with a checkpoint: the state
                    // is saved while parking.
                    let presave = op == guest_agent::abi::op::SPECULATE;
                    match ctx.events.send(call) {
                        Ok(()) => self.park_with(&ctx, &link, presave),
                        Err(_) => Ok(Next::Stop),
                    }
                }
                Ok(Next::SyscallEntry) => self.enter_kernel(&ctx),
                other => other,
            };
            match step {
                Ok(Next::Continue | Next::SyscallEntry | Next::Hypercall(..)) => {}
                Ok(Next::Stop) => break,
                Err(msg) => {
                    // A guest that fails on memory still being checked
                    // may fail because of the damage: the check's verdict
                    // goes first.
                    if hold_output(&ctx) {
                        let _ = ctx.events.send(VmEvent::Fatal(msg));
                    }
                    break;
                }
            }
        }
        tracing::debug!(vcpu = self.index, "vCPU thread ends");
    }

    /// Stops at a clean instruction boundary, tells the controller, and
    /// carries out its commands until it says to run on. With `presave`,
    /// the state is saved on the way ([`VcpuReply::ParkedSaved`]; if the
    /// save fails, a plain `Parked`, and the controller's own `Save` meets
    /// the error).
    fn park_with(
        &mut self,
        ctx: &VcpuContext,
        link: &VcpuLink,
        presave: bool,
    ) -> Result<Next, String> {
        // A new request to park may have come in meanwhile: this covers it,
        // and its wish for a save too.
        let presave = presave || link.attention.take() == Some(true);
        self.complete_pending_io(ctx)?;
        self.refresh_pending();
        // The general registers as KVM holds them, once this park has read
        // or written them (they cannot change while parked): a hypercall's
        // result after a `Save` then costs one ioctl, not two.
        let mut regs: Option<kvm_bindings::kvm_regs> = None;
        let parked = match presave.then(|| self.save_parked()) {
            Some(Ok(s)) => {
                regs = Some(s.regs);
                VcpuReply::ParkedSaved(Box::new(s))
            }
            _ => VcpuReply::Parked,
        };
        if link.replies.send(parked).is_err() {
            return Ok(Next::Stop);
        }
        loop {
            let reply = match link.cmds.recv() {
                Err(_) => return Ok(Next::Stop),
                Ok(VcpuCmd::Resume) => return Ok(Next::Continue),
                Ok(VcpuCmd::Save) => match self.save_parked() {
                    Ok(s) => {
                        regs = Some(s.regs);
                        VcpuReply::Saved(Box::new(s))
                    }
                    Err(e) => VcpuReply::Failed(e.to_string()),
                },
                Ok(VcpuCmd::Restore(s, tsc)) => {
                    // No answer (see `VcpuCmd::Restore`): a vCPU that cannot
                    // take its checkpoint back must not run on, so a failure
                    // ends the VM.
                    self.restore_with_tsc(&s, tsc)
                        .map_err(|e| format!("restoring the vCPU's state: {e}"))?;
                    regs = Some(s.regs);
                    continue;
                }
                Ok(VcpuCmd::SetResult([rax, rdx, rsi])) => {
                    // No answer (see `VcpuCmd::SetResult`): a failure ends
                    // the VM, since the guest would run on with a wrong result.
                    let mut r = match regs {
                        Some(r) => r,
                        None if self.sync_regs != SyncRegs::Off
                            && (self.sync_fresh || self.sync_pending != 0) =>
                        {
                            self.fd.sync_regs().regs
                        }
                        None => self
                            .fd
                            .get_regs()
                            .map_err(|e| format!("a hypercall's result: KVM_GET_REGS: {e}"))?,
                    };
                    (r.rax, r.rdx, r.rsi) = (rax, rdx, rsi);
                    if self.sync_regs != SyncRegs::Off {
                        self.load_synced(Some(&r), None);
                    } else {
                        self.fd
                            .set_regs(&r)
                            .map_err(|e| format!("a hypercall's result: KVM_SET_REGS: {e}"))?;
                    }
                    self.sync_fresh = false;
                    regs = Some(r);
                    continue;
                }
            };
            if link.replies.send(reply).is_err() {
                return Ok(Next::Stop);
            }
        }
    }

    /// Finishes the instruction whose exit was just handled, without running
    /// the guest further: KVM_RUN with `immediate_exit` set completes a
    /// pending port or MMIO access and returns at once (api.rst). After it,
    /// the vCPU's registers describe a state that can be saved and resumed.
    /// Skipped when the last KVM_RUN came back by a signal: KVM runs a
    /// pending completion at the start of KVM_RUN, before it looks for
    /// signals, so none is left (one vCPU ioctl fewer for a kicked vCPU).
    fn complete_pending_io(&mut self, ctx: &VcpuContext) -> Result<(), String> {
        if !std::mem::take(&mut self.completion_due) {
            return Ok(());
        }
        loop {
            self.fd.set_kvm_immediate_exit(1);
            let r = self.fd.run();
            self.sync_fresh = r.is_ok()
                || matches!(&r, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
            let next = match r {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(Err(format!(
                    "vCPU {}: completing an access before parking: {e}",
                    self.index
                ))),
                // Completion started another access (a string I/O
                // instruction): serve it like any other, then try again.
                Ok(mut exit) => match serve_access(ctx, &mut exit) {
                    Some(_) => Some(Ok(())),
                    None => Some(Err(format!(
                        "vCPU {}: unexpected exit {exit:?} while parking",
                        self.index
                    ))),
                },
            };
            self.fd.set_kvm_immediate_exit(0);
            match next {
                None => return Ok(()),
                Some(Ok(())) => continue,
                Some(Err(e)) => return Err(e),
            }
        }
    }

    fn run_once(&mut self, ctx: &VcpuContext) -> Result<Next, String> {
        let idx = self.index;
        if ctx.progress.wants_sample(idx) {
            ctx.progress
                .record_rip(idx, self.fd.get_regs().map_or(0, |r| r.rip));
        }
        let r = self.fd.run();
        self.sync_fresh = r.is_ok()
            || matches!(&r, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
        self.completion_due = r.is_ok();
        ctx.progress.count_exit();
        let mut exit = match r {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Next::Continue)
            }
            Err(e) => return Err(format!("vCPU {idx}: KVM_RUN failed: {e}")),
        };
        if let Some(r) = serve_access(ctx, &mut exit) {
            return Ok(match r {
                WriteResult::Done | WriteResult::Unclaimed => Next::Continue,
                WriteResult::Trap(t) => self.trap(t),
            });
        }
        let deferred = match exit {
            VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET => {
                if hold_output(ctx) {
                    let _ = ctx.events.send(VmEvent::GuestReset);
                }
                return Ok(Next::Stop);
            }
            VcpuExit::X86Wrmsr(m) => Deferred::Wrmsr(m.index, m.data),
            VcpuExit::Shutdown => Deferred::Shutdown,
            VcpuExit::InternalError => Deferred::InternalError,
            VcpuExit::Hlt => Deferred::Fatal("halted with interrupts off (KVM_EXIT_HLT)".into()),
            VcpuExit::Unsupported(super::dirty::EXIT_DIRTY_RING_FULL) => {
                return match &ctx.dirty_rings {
                    Some(r) => r
                        .drain_full(usize::from(idx))
                        .map(|()| Next::Continue)
                        .map_err(|e| format!("vCPU {idx}: emptying its full dirty ring: {e}")),
                    None => Err(format!("vCPU {idx}: dirty ring full, but the VM has no rings")),
                };
            }
            VcpuExit::FailEntry(reason, cpu) => {
                Deferred::Fatal(format!("VM entry failed (KVM_EXIT_FAIL_ENTRY), hardware reason {reason:#x} on host CPU {cpu}"))
            }
            other => Deferred::Fatal(format!("unexpected exit {other:?}")),
        };
        self.handle_deferred(ctx, deferred)
    }

    /// Handles an exit that needs the vCPU's registers or ioctls.
    fn handle_deferred(&mut self, ctx: &VcpuContext, deferred: Deferred) -> Result<Next, String> {
        let idx = self.index;
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        tracing::debug!(regs = ?self.fd.get_regs(), sregs = ?self.fd.get_sregs(), "exit needing attention");
        match deferred {
            Deferred::Shutdown => Err(format!(
                "vCPU {idx}: guest triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}"
            )),
            Deferred::Fatal(what) => Err(format!("vCPU {idx}: {what} at rip {rip:#x}")),
            Deferred::InternalError => self.emulation_failure(ctx, rip),
            Deferred::Wrmsr(index, data) => match &ctx.compat {
                Some(c) => c
                    .on_wrmsr(&self.fd, &ctx.mem, index, data)
                    .map(|()| Next::Continue)
                    .map_err(|e| format!("vCPU {idx}: WRMSR {index:#x} at rip {rip:#x}: {e}")),
                None => Err(format!(
                    "vCPU {idx}: unexpected WRMSR exit for MSR {index:#x} at rip {rip:#x}"
                )),
            },
        }
    }

    /// Hands a device's request for the whole VM to the controller, and
    /// parks until it is served. This is the only place the exit borrow of
    /// `kvm_run` is released before the vCPU is read again.
    fn trap(&self, t: VcpuTrap) -> Next {
        match t {
            VcpuTrap::Hypercall(op) => {
                // Right after KVM_RUN: `kvm_run`'s copy is current, if kept.
                let arg = if self.sync_regs != SyncRegs::Off && self.sync_fresh {
                    self.fd.sync_regs().regs.rdi
                } else {
                    self.fd.get_regs().map(|r| r.rdi).unwrap_or(0)
                };
                Next::Hypercall(op, arg)
            }
            VcpuTrap::SyscallEntry => Next::SyscallEntry,
        }
    }

    /// Completes the trampoline's doorbell write, then lets the host-compat
    /// layer carry the vCPU into the guest kernel.
    fn enter_kernel(&mut self, ctx: &VcpuContext) -> Result<Next, String> {
        self.complete_pending_io(ctx)?;
        if let Some(c) = &ctx.compat {
            // REGS and SREGS change through ioctls: the exit's copy in
            // `kvm_run` no longer holds them, and a park before the next
            // KVM_RUN (which makes no KVM_RUN of its own, the access being
            // complete) must not save it.
            self.sync_fresh = false;
            c.enter_kernel(&self.fd)
                .map_err(|e| format!("vCPU {}: {e}", self.index))?;
        }
        Ok(Next::Continue)
    }

    /// Handles KVM_EXIT_INTERNAL_ERROR: completes the instruction through the
    /// host-compat layer if it can, and otherwise names it.
    fn emulation_failure(&mut self, ctx: &VcpuContext, rip: u64) -> Result<Next, String> {
        let idx = self.index;
        let (suberror, insn) = self.internal_error_info(&ctx.mem, rip);
        if suberror != INTERNAL_ERROR_EMULATION {
            return Err(format!(
                "vCPU {idx}: KVM internal error, suberror {suberror}, at rip {rip:#x}"
            ));
        }
        if let Some(compat) = &ctx.compat {
            // It writes registers through ioctls (see `enter_kernel`).
            self.sync_fresh = false;
            match compat.complete(&self.fd, &insn) {
                Ok(true) => return Ok(Next::Continue),
                Ok(false) => {}
                Err(e) => {
                    return Err(format!(
                        "vCPU {idx}: completing an instruction at rip {rip:#x}: {e}"
                    ))
                }
            }
        }
        Err(format!(
            "vCPU {idx}: instruction emulation failed at rip {rip:#x}: bytes [{}] ({})",
            host_compat::hex_bytes(&insn),
            host_compat::describe(&insn)
        ))
    }

    /// The internal-error suberror and the failing instruction's bytes: from
    /// the exit itself when KVM supplied them, otherwise read from guest
    /// memory through the vCPU's page tables.
    fn internal_error_info(&mut self, mem: &GuestMemoryMmap, rip: u64) -> (u32, Vec<u8>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member KVM filled; it is plain old data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let mut insn = Vec::new();
        if internal.suberror == INTERNAL_ERROR_EMULATION
            && internal.ndata >= 2
            && internal.data[0] & EMULATION_FLAG_INSN_BYTES != 0
        {
            // data[1..] holds the size byte, then up to 15 instruction bytes.
            let raw: Vec<u8> = internal.data[1..]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let len = usize::from(raw[0]).min(15);
            insn.extend_from_slice(&raw[1..=len]);
        }
        if insn.is_empty() {
            if let Ok(t) = self.fd.translate_gva(rip) {
                if t.valid != 0 {
                    let mut buf = [0u8; 15];
                    let in_page = (4096 - (t.physical_address & 0xfff)) as usize;
                    let n = in_page.min(15);
                    if mem
                        .read_slice(&mut buf[..n], GuestAddress(t.physical_address))
                        .is_ok()
                    {
                        insn.extend_from_slice(&buf[..n]);
                    }
                }
            }
        }
        (internal.suberror, insn)
    }
}

/// Serves a port or MMIO access on its bus: unclaimed reads see all ones,
/// unclaimed writes are dropped. `None` if `exit` is not an access.
fn serve_access(ctx: &VcpuContext, exit: &mut VcpuExit<'_>) -> Option<WriteResult> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(*port), data) {
                data.fill(0xff);
            }
            Some(WriteResult::Done)
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(*addr, data) {
                data.fill(0xff);
            }
            Some(WriteResult::Done)
        }
        VcpuExit::IoOut(port, data) => Some(write_held(ctx, &ctx.pio, u64::from(*port), data)),
        VcpuExit::MmioWrite(addr, data) => Some(write_held(ctx, &ctx.mmio, *addr, data)),
        _ => None,
    }
}

/// A write on `bus`, which first waits, if it leaves the VM, until a
/// restored VM's memory is known good (`--verify before-output`). A write
/// that a stop overtakes is dropped: the VM is ending.
fn write_held(ctx: &VcpuContext, bus: &Bus, addr: u64, data: &[u8]) -> WriteResult {
    if ctx.checked.holds_output() && bus.write_leaves_vm(addr, data.len()) && !hold_output(ctx) {
        return WriteResult::Unclaimed;
    }
    bus.write(addr, data)
}

/// Waits, while a restored VM's output is held, until its memory is known
/// good. False if the VM stops first. A vCPU waiting here answers no
/// request to park: it sits in an exit whose access is not yet served, so
/// it cannot park cleanly, and the wait is bounded by the check (which
/// either passes or ends the process).
fn hold_output(ctx: &VcpuContext) -> bool {
    if !ctx.checked.holds_output() {
        return true;
    }
    if ctx.checked.first_hold() {
        tracing::info!("the guest's output waits for the check of its memory");
    }
    let t = std::time::Instant::now();
    let open = ctx.checked.wait(&ctx.stop);
    tracing::debug!(
        micros = t.elapsed().as_micros() as u64,
        open,
        "a vCPU waited for the memory check"
    );
    open
}

/// Asks KVM to exit to the VMM, with the instruction bytes, on every
/// emulation failure (KVM_CAP_EXIT_ON_EMULATION_FAILURE). Hosts without the
/// capability still exit on most failures; the bytes are then read from
/// guest memory.
pub fn enable_exit_on_emulation_failure(vm: &kvm_ioctls::VmFd) {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = vm.enable_cap(&cap) {
        tracing::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not enabled: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vCPU 0 of a new VM (kept alive by the first half), passing `sync`
    /// through `kvm_run`; `None`, the skip recorded, without a usable KVM.
    fn test_vcpu(test: &str, sync: SyncRegs) -> Option<(kvm_ioctls::VmFd, Vcpu)> {
        let (kvm, vm, fd) = crate::test_util::kvm_vcpu_or_skip(test)?;
        let caps = Arc::new(StateCaps::probe(&kvm, &fd));
        let mut v = Vcpu::new(fd, 0, caps);
        v.use_sync_regs(sync);
        Some((vm, v))
    }

    /// A rollback's registers wait in `kvm_run` until the next KVM_RUN; a
    /// save meanwhile must read them, not the older ones KVM still holds.
    #[test]
    fn registers_waiting_in_kvm_run_are_what_a_save_reads() {
        let test = "vstate::vcpu::registers_waiting_in_kvm_run_are_what_a_save_reads";
        let Some((_vm, mut v)) = test_vcpu(test, SyncRegs::OneVcpu) else {
            return;
        };
        let mut target = v.save().expect("the first save");
        let old_rax = target.regs.rax;
        target.regs.rax = old_rax ^ 0x5a5a;
        target.regs.rbx = 0x1234;
        target.events.nmi.pending = 1;
        v.restore(&target).expect("the restore");
        assert_ne!(v.sync_pending, 0, "REGS and VCPU_EVENTS wait in kvm_run");
        assert_eq!(v.fd.get_regs().unwrap().rax, old_rax, "not loaded yet");
        let got = v.save().expect("a save before the next KVM_RUN");
        assert_eq!((got.regs.rax, got.regs.rbx), (old_rax ^ 0x5a5a, 0x1234));
        assert_eq!(got.events.nmi.pending, 1);
        // Loaded into KVM by the save; the same values load again at the
        // next KVM_RUN.
        assert_eq!(v.fd.get_regs().unwrap().rbx, 0x1234);
    }

    /// With several vCPUs, a rollback's registers wait in `kvm_run` too; a
    /// parked save writes them and takes them out of `kvm_run`, so an INIT
    /// the save takes in is not undone by KVM loading them again at the
    /// next KVM_RUN.
    #[test]
    fn a_parked_save_leaves_nothing_for_kvm_to_load_over_an_init() {
        let test = "vstate::vcpu::a_parked_save_leaves_nothing_for_kvm_to_load_over_an_init";
        let Some((_vm, mut v)) = test_vcpu(test, SyncRegs::ManyVcpus) else {
            return;
        };
        let mut target = v.save_parked().expect("the first save");
        target.regs.rip = 0x1234;
        v.restore(&target).expect("the restore");
        assert_ne!(v.fd.get_kvm_run().kvm_dirty_regs, 0, "REGS wait in kvm_run");
        let mut ev = v.fd.get_vcpu_events().unwrap();
        ev.flags = kvm_bindings::KVM_VCPUEVENT_VALID_SMM;
        ev.smi.latched_init = 1;
        v.fd.set_vcpu_events(&ev).expect("latching an INIT");
        let got = v.save_parked().expect("a save that takes in the INIT");
        assert_eq!(got.regs.rip, 0xfff0, "the registers after INIT");
        assert_eq!(v.fd.get_kvm_run().kvm_dirty_regs, 0, "left to load again");
        assert_eq!(v.sync_pending, 0);
        // The next KVM_RUN (returning at once) loads nothing over it.
        v.fd.set_kvm_immediate_exit(1);
        let r = v.fd.run().map(|_| ());
        assert!(matches!(&r, Err(e) if e.errno() == libc::EINTR), "{r:?}");
        assert_eq!(v.fd.get_regs().unwrap().rip, 0xfff0);
    }

    /// One request, one park: taking it clears it, and a request to save
    /// stays one when a request only to park comes after it.
    #[test]
    fn a_request_to_save_outlasts_a_later_request_to_park() {
        let a = Attention::default();
        assert_eq!(a.take(), None);
        a.request(false);
        assert_eq!(a.take(), Some(false));
        assert_eq!(a.take(), None);
        a.request(true);
        a.request(false);
        assert_eq!(a.take(), Some(true));
        assert_eq!(a.take(), None);
        a.request(false);
        a.request(true);
        assert_eq!(a.take(), Some(true));
    }
}
