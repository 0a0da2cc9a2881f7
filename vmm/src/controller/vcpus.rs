//! The controller's end of the vCPU threads: each vCPU has a command
//! channel and a reply channel of its own, so waiting for one vCPU never
//! takes another's answer, or a VM event, out of turn.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{Killable, SIGRTMIN};

use super::ControlError;
use crate::event::{VcpuCmd, VcpuReply};
use crate::machine::{MachineError, VcpuTarget};
use crate::spec::checkpoint::WaitingCall;
use crate::vstate::vcpu::{Attention, CallSlot};
use crate::vstate::vcpu_state::VcpuState;

/// How long to wait for a vCPU to park before kicking it again. A kick can
/// be lost if it lands just before the thread enters KVM_RUN.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// The controller's end of one vCPU thread.
pub struct VcpuHandle {
    cmds: Sender<VcpuCmd>,
    replies: Receiver<VcpuReply>,
    attention: Arc<Attention>,
    call: Arc<CallSlot>,
    thread: JoinHandle<()>,
    parked: bool,
    /// It made a hypercall and is parking on its own, but its reply has
    /// not been read yet ([`VcpuSet::pause_running`]): read before any
    /// command or resume goes to it.
    parking: bool,
    /// A rollback decided what becomes of the call it waited on (dropped,
    /// or put back to be served again): the call being served, if it was
    /// this vCPU's, gets no result of its own ([`VcpuSet::take_rolled`]).
    rolled: bool,
    /// Which call waits, for [`VcpuSet::waiting_calls`]: how many of its
    /// calls were served before it, in this timeline (a rollback that puts
    /// a call back sets it back to that call's).
    served: u64,
    /// How many of its hypercall events the controller has read.
    received: u64,
    /// Events up to this count belong to calls a rollback dropped: read,
    /// they are ignored ([`VcpuSet::receive`]).
    discard_upto: u64,
    /// The state the vCPU saved as it parked for a `speculate`
    /// ([`VcpuReply::ParkedSaved`]): the next save takes it. Dropped with
    /// every command or resume sent, which may change the state.
    presaved: Option<Box<VcpuState>>,
}

impl VcpuHandle {
    /// A handle for a running vCPU thread, from the controller's ends of
    /// its link (`crate::vstate::vcpu::VcpuLink` is the thread's).
    pub fn new(
        cmds: Sender<VcpuCmd>,
        replies: Receiver<VcpuReply>,
        attention: Arc<Attention>,
        call: Arc<CallSlot>,
        thread: JoinHandle<()>,
    ) -> Self {
        Self {
            cmds,
            replies,
            attention,
            call,
            thread,
            parked: false,
            parking: false,
            rolled: false,
            served: 0,
            received: 0,
            discard_upto: 0,
            presaved: None,
        }
    }

    /// Sends `cmd`; the state saved at the park is stale from here on.
    /// The vCPU must be parked, or [`VcpuHandle::settle`]d first.
    fn send(&mut self, cmd: VcpuCmd) -> bool {
        self.presaved = None;
        self.cmds.send(cmd).is_ok()
    }

    /// Reads the park of a vCPU left parking by [`VcpuSet::pause_running`].
    fn settle(&mut self, index: usize) -> Result<(), ControlError> {
        while self.parking && !self.parked {
            self.await_park(index, None)?;
        }
        self.parking = false;
        Ok(())
    }

    fn kick(&self) {
        let _ = self.thread.kill(SIGRTMIN());
    }

    /// Waits up to `wait` for the vCPU to say it parked.
    fn await_park(&mut self, index: usize, wait: Option<Duration>) -> Result<bool, ControlError> {
        let r = match wait {
            Some(t) => self.replies.recv_timeout(t),
            None => self
                .replies
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        let presaved = match r {
            Ok(VcpuReply::Parked) => None,
            Ok(VcpuReply::ParkedSaved(s)) => Some(s),
            Ok(other) => {
                return Err(ControlError::Vcpu(format!(
                    "vCPU {index}: expected it to park, got {other:?}"
                )))
            }
            Err(RecvTimeoutError::Timeout) => return Ok(false),
            Err(RecvTimeoutError::Disconnected) => return Err(gone(index)),
        };
        (self.parked, self.parking) = (true, false);
        self.presaved = presaved;
        // The vCPU waits for commands now, so any request to park is
        // met. One can still be set: the controller asks a vCPU it sees
        // running (no call pending), and the vCPU, between that look and
        // the request, makes a hypercall and parks for it, taking the
        // request's flag before the request is made. Left set, it would
        // park the vCPU again at its next turn after the resume, unasked,
        // and the controller (which thinks it runs) would never resume it.
        self.attention.take();
        Ok(true)
    }
}

fn gone(index: usize) -> ControlError {
    ControlError::Vcpu(format!("vCPU {index} stopped"))
}

/// Every vCPU of the VM.
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
    /// The vCPUs whose calls a rollback put back, whose events were read
    /// already (or are to be ignored): served by the controller before its
    /// next event ([`VcpuSet::take_reissued`]). Each call's op and argument
    /// are in its vCPU's slot, where the vCPU, parked on it, leaves them.
    reissued: VecDeque<usize>,
}

impl VcpuSet {
    /// The set of running vCPU threads; `stop` ends their loops.
    pub fn new(handles: Vec<VcpuHandle>, stop: Arc<AtomicBool>) -> Self {
        Self {
            handles,
            stop,
            reissued: VecDeque::new(),
        }
    }

    /// How many vCPUs there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, for a built VM).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Parks every vCPU at a clean instruction boundary. A vCPU whose
    /// hypercall waits parks on its own and is not kicked. With `save`
    /// (a checkpoint or a snapshot follows), each vCPU kicked saves its
    /// state as it parks, on its own thread, for [`VcpuSet::save_all`].
    pub fn pause_all(&mut self, save: bool) -> Result<(), ControlError> {
        self.pause_running(save)?;
        self.settle_all()
    }

    /// [`VcpuSet::pause_all`], but a vCPU whose hypercall waits is not
    /// waited for: it is out of KVM_RUN (it reported the call from its
    /// thread), so it neither runs guest code nor writes guest memory, and
    /// the controller's memory step can go on while it parks, and saves
    /// for a `speculate`. Its park is read before any command or resume
    /// goes to it, or by [`VcpuSet::settle_all`].
    pub fn pause_running(&mut self, save: bool) -> Result<(), ControlError> {
        for h in self.handles.iter_mut().filter(|h| !h.parked) {
            if h.call.pending() {
                h.parking = true;
            } else {
                h.attention.request(save);
                h.kick();
            }
        }
        for (i, h) in self.handles.iter_mut().enumerate() {
            while !h.parked && !h.parking {
                if !h.await_park(i, Some(KICK_INTERVAL))? {
                    h.kick();
                }
            }
        }
        Ok(())
    }

    /// Waits until every vCPU left parking by [`VcpuSet::pause_running`]
    /// has parked.
    pub fn settle_all(&mut self) -> Result<(), ControlError> {
        for (i, h) in self.handles.iter_mut().enumerate() {
            h.settle(i)?;
        }
        Ok(())
    }

    /// Waits until vCPU `i`, which made a hypercall, has parked itself.
    pub fn wait_parked(&mut self, i: usize) -> Result<(), ControlError> {
        let h = self.handles.get_mut(i).ok_or_else(|| gone(i))?;
        while !h.parked {
            h.await_park(i, None)?;
        }
        Ok(())
    }

    /// Lets every parked vCPU run on, except those whose hypercall waits.
    pub fn resume_all(&mut self) {
        for (i, h) in self.handles.iter_mut().enumerate() {
            // A vCPU that is gone is resumed by no one.
            let _ = h.settle(i);
        }
        for h in self.handles.iter_mut().filter(|h| h.parked) {
            if !h.call.pending() {
                let _ = h.send(VcpuCmd::Resume);
                h.parked = false;
            }
        }
    }

    /// The hypercall of vCPU `i` has been served: it may run on.
    pub fn call_served(&mut self, i: usize) {
        if let Some(h) = self.handles.get_mut(i) {
            h.served += 1;
            h.call.set_pending(false);
        }
    }

    /// Counts a hypercall event of vCPU `i` as read; `false` if its call
    /// was dropped by a rollback since it was made (then it is not served:
    /// its vCPU runs on from the checkpoint's state).
    pub fn receive(&mut self, i: usize) -> bool {
        match self.handles.get_mut(i) {
            Some(h) => {
                h.received += 1;
                h.received > h.discard_upto
            }
            None => false,
        }
    }

    /// A call a rollback put back, to serve before the next event: (vCPU,
    /// op, argument).
    pub fn take_reissued(&mut self) -> Option<(u8, u32, u64)> {
        let i = self.reissued.pop_front()?;
        let (op, arg) = self.handles.get(i)?.call.call();
        // vCPU indices are APIC IDs, below 256.
        Some((u8::try_from(i).ok()?, op, arg))
    }

    /// For each vCPU, the call that waits now, if one does (named by how
    /// many of its calls were served before it). A checkpoint keeps this:
    /// a vCPU saved while its call waited is put back waiting for that
    /// call's answer, so a rollback there serves the call again.
    pub fn waiting_calls(&self) -> Vec<Option<WaitingCall>> {
        self.handles
            .iter()
            .map(|h| {
                h.call.pending().then(|| {
                    let (op, arg) = h.call.call();
                    WaitingCall {
                        seq: h.served,
                        op,
                        arg,
                    }
                })
            })
            .collect()
    }

    /// After a rollback to a checkpoint that kept `at_checkpoint`
    /// ([`VcpuSet::waiting_calls`]), with every vCPU parked and its state
    /// the checkpoint's. For each vCPU:
    /// - no call waited then: it runs on from there; a call it waits on
    ///   now was made in the timeline thrown away and is dropped (its
    ///   event, if still on its way, is ignored when read);
    /// - a call waited then: the vCPU waits on it again. If that call
    ///   still waits, unserved, with its event on its way, it is served as
    ///   usual; otherwise it is served again ([`VcpuSet::take_reissued`]),
    ///   and the event of a later call is ignored.
    ///
    /// Every vCPU is marked ([`VcpuSet::take_rolled`]): a call being
    /// served as this happens, whichever vCPU made it, gets no result of
    /// its own.
    pub fn after_rollback(&mut self, at_checkpoint: &[Option<WaitingCall>]) {
        for (i, h) in self.handles.iter_mut().enumerate() {
            h.rolled = true;
            let made = h.call.made();
            let on_its_way = made > h.received.max(h.discard_upto);
            let then = at_checkpoint.get(i).copied().flatten();
            self.reissued.retain(|&v| v != i);
            match then {
                Some(w) if h.call.pending() && h.served == w.seq && on_its_way => {}
                Some(w) => {
                    if on_its_way {
                        h.discard_upto = made;
                    }
                    h.served = w.seq;
                    h.call.put_back(w.op, w.arg);
                    self.reissued.push_back(i);
                }
                None => {
                    if on_its_way {
                        h.discard_upto = made;
                    }
                    h.call.set_pending(false);
                }
            }
        }
    }

    /// Whether a rollback has decided the fate of vCPU `i`'s call since
    /// the last look ([`VcpuSet::after_rollback`]). Clears the mark.
    pub fn take_rolled(&mut self, i: usize) -> bool {
        self.handles
            .get_mut(i)
            .is_some_and(|h| std::mem::take(&mut h.rolled))
    }

    /// Whether a vCPU other than `except` has a hypercall waiting.
    pub fn call_pending(&self, except: Option<usize>) -> bool {
        self.handles
            .iter()
            .enumerate()
            .any(|(i, h)| Some(i) != except && h.call.pending())
    }

    /// Sends parked vCPU `i` a command that has no answer
    /// ([`VcpuCmd::SetResult`]), without waiting.
    pub fn tell(&mut self, i: usize, cmd: VcpuCmd) -> Result<(), ControlError> {
        let h = self.handles.get_mut(i).ok_or_else(|| gone(i))?;
        h.settle(i)?;
        match h.send(cmd) {
            true => Ok(()),
            false => Err(gone(i)),
        }
    }

    /// Sends `cmd` to parked vCPU `i` and waits for its answer.
    pub fn command(&mut self, i: usize, cmd: VcpuCmd) -> Result<VcpuReply, ControlError> {
        let h = self.handles.get_mut(i).ok_or_else(|| gone(i))?;
        h.settle(i)?;
        if !h.send(cmd) {
            return Err(gone(i));
        }
        match h.replies.recv().map_err(|_| gone(i))? {
            VcpuReply::Failed(m) => Err(ControlError::Vcpu(format!("vCPU {i}: {m}"))),
            VcpuReply::Parked | VcpuReply::ParkedSaved(_) => Err(ControlError::Vcpu(format!(
                "vCPU {i}: parked again while parked"
            ))),
            r => Ok(r),
        }
    }

    /// Every vCPU's state, by index, each saved on its own thread at the
    /// same time (all are asked before any answer is read), or taken from
    /// what it saved as it parked ([`VcpuReply::ParkedSaved`]). All must be
    /// parked. Every answer is read before an error is returned, so none
    /// is left for a later command; the error names the first vCPU that
    /// failed.
    pub fn save_all(&mut self) -> Result<Vec<VcpuState>, ControlError> {
        self.settle_all()?;
        // `None`: asked, the answer is on the way.
        let known: Vec<Option<Result<VcpuReply, ControlError>>> = self
            .handles
            .iter_mut()
            .enumerate()
            .map(|(i, h)| match h.presaved.take() {
                Some(s) => Some(Ok(VcpuReply::Saved(s))),
                None if h.send(VcpuCmd::Save) => None,
                None => Some(Err(gone(i))),
            })
            .collect();
        let mut states = Vec::with_capacity(known.len());
        let mut first_err = None;
        for (i, known) in known.into_iter().enumerate() {
            let r = known.unwrap_or_else(|| self.handles[i].replies.recv().map_err(|_| gone(i)));
            let e = match r {
                Ok(VcpuReply::Saved(s)) => {
                    states.push(*s);
                    continue;
                }
                Ok(VcpuReply::Failed(m)) => ControlError::Vcpu(format!("vCPU {i}: {m}")),
                Ok(r) => ControlError::Vcpu(format!("vCPU {i}: expected its state, got {r:?}")),
                Err(e) => e,
            };
            first_err.get_or_insert(e);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(states),
        }
    }

    /// Stops every vCPU thread: raises the stop flag, lets parked ones go,
    /// and kicks the others out of KVM_RUN until each has ended.
    pub fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Release);
        for h in self.handles.drain(..) {
            let _ = h.cmds.send(VcpuCmd::Resume);
            drop(h.cmds);
            while !h.thread.is_finished() {
                let _ = h.thread.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.thread.join();
        }
    }
}

impl VcpuTarget for VcpuSet {
    fn count(&self) -> usize {
        self.len()
    }

    fn restore_vcpu(
        &mut self,
        index: usize,
        state: VcpuState,
        tsc_advance_ns: Option<u64>,
    ) -> Result<(), MachineError> {
        self.tell(index, VcpuCmd::Restore(Box::new(state), tsc_advance_ns))
            .map_err(|e| MachineError::Vcpu(index, e.to_string()))
    }

    /// Each vCPU restores its own state on its own thread, all at once,
    /// and meanwhile the controller goes on (see [`VcpuCmd::Restore`]).
    fn restore_all(
        &mut self,
        states: Vec<VcpuState>,
        tsc_advance_ns: Option<u64>,
    ) -> Result<(), MachineError> {
        for (i, s) in states.into_iter().enumerate() {
            self.restore_vcpu(i, s, tsc_advance_ns)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set of `n` handles whose threads have already ended, and each
    /// one's call slot, for tests of the bookkeeping alone.
    fn handles(n: usize) -> (VcpuSet, Vec<Arc<CallSlot>>) {
        let mut hs = Vec::new();
        let mut slots = Vec::new();
        for _ in 0..n {
            let (cmds, _) = std::sync::mpsc::channel();
            let (_, replies) = std::sync::mpsc::channel();
            let slot = Arc::new(CallSlot::default());
            let thread = std::thread::spawn(|| {});
            hs.push(VcpuHandle::new(
                cmds,
                replies,
                Arc::new(Attention::default()),
                slot.clone(),
                thread,
            ));
            slots.push(slot);
        }
        (VcpuSet::new(hs, Arc::new(AtomicBool::new(false))), slots)
    }

    /// What the controller does with one call of vCPU `i` whose event it
    /// reads: `false` if the event is ignored; else it is served, marked
    /// served (no rollback decides it here).
    fn serve(set: &mut VcpuSet, i: usize) -> bool {
        if !set.receive(i) {
            return false;
        }
        set.take_rolled(i);
        set.call_served(i);
        true
    }

    /// A park the controller reads meets every request to park made
    /// before it: a request made as the vCPU parked for a hypercall on its
    /// own is dropped, so it cannot park the vCPU again after its resume.
    #[test]
    fn a_park_read_drops_a_request_it_met() {
        let (cmds, _cmd_rx) = std::sync::mpsc::channel();
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let attention = Arc::new(Attention::default());
        let mut h = VcpuHandle::new(
            cmds,
            replies,
            attention.clone(),
            Arc::new(CallSlot::default()),
            std::thread::spawn(|| {}),
        );
        // The vCPU took no request (there was none) and parked for its
        // call; the controller's request lands after that.
        reply_tx.send(VcpuReply::Parked).unwrap();
        attention.request(false);
        assert!(h.await_park(0, None).unwrap());
        assert!(h.parked);
        assert_eq!(attention.take(), None, "the request outlived the park");
    }

    /// After a rollback: a call that waited at the checkpoint, unserved
    /// since, is served as usual from its event; one served since is put
    /// back and served again, and the event of the vCPU's later call is
    /// ignored; a call made after the checkpoint by a vCPU that did not
    /// wait then is dropped.
    #[test]
    fn a_rollback_serves_again_the_calls_that_waited_and_drops_the_later_ones() {
        let (mut set, slots) = handles(3);
        // vCPUs 0 and 1 wait on a call as the checkpoint is taken.
        slots[0].post(4, 40);
        slots[1].post(5, 50);
        let at_checkpoint = set.waiting_calls();
        let first = WaitingCall {
            seq: 0,
            op: 4,
            arg: 40,
        };
        assert_eq!(
            at_checkpoint,
            vec![
                Some(first),
                Some(WaitingCall {
                    seq: 0,
                    op: 5,
                    arg: 50
                }),
                None
            ]
        );
        // vCPU 0's call is served, and it makes another; vCPU 2 makes its
        // first; vCPU 1's call still waits, its event unread.
        assert!(serve(&mut set, 0));
        slots[0].post(6, 60);
        slots[2].post(7, 70);
        set.after_rollback(&at_checkpoint);
        // vCPU 0 waits on its first call again, which is served again.
        assert!(slots[0].pending());
        assert_eq!(set.take_reissued(), Some((0, 4, 40)));
        assert_eq!(set.take_reissued(), None, "nothing else is put back");
        assert!(!serve(&mut set, 0), "vCPU 0's later call is ignored");
        assert_eq!(set.waiting_calls()[0], Some(first), "the same call waits");
        assert!(set.take_rolled(0));
        set.call_served(0);
        // vCPU 1's call is served from its event, as usual.
        assert!(slots[1].pending());
        assert!(serve(&mut set, 1));
        // vCPU 2 runs on from the checkpoint: its call is dropped.
        assert!(!slots[2].pending());
        assert!(!serve(&mut set, 2));
        // Later calls are served as usual.
        slots[2].post(8, 80);
        assert!(serve(&mut set, 2));
        slots[0].post(9, 90);
        assert_eq!(set.waiting_calls()[0].map(|w| w.seq), Some(1));
        assert!(serve(&mut set, 0));
    }

    /// A call whose own serving rolls the machine back to a checkpoint
    /// taken while it waited (an `abort` that ends a speculation the host
    /// began as the call waited) is served again, and gets no result from
    /// the first serving.
    #[test]
    fn a_call_rolled_back_to_where_it_waited_is_served_again() {
        let (mut set, slots) = handles(1);
        slots[0].post(3, 0);
        // The host's checkpoint, as the call waits.
        let at_checkpoint = set.waiting_calls();
        // The call's event is read and served: it rolls back there.
        assert!(set.receive(0));
        set.take_rolled(0);
        set.after_rollback(&at_checkpoint);
        assert!(set.take_rolled(0), "the first serving gives no result");
        assert!(slots[0].pending(), "the vCPU still waits");
        assert_eq!(set.take_reissued(), Some((0, 3, 0)));
        // The second serving, with no rollback, answers it.
        assert!(!set.take_rolled(0));
        set.call_served(0);
        assert!(!slots[0].pending());
        assert_eq!(set.take_reissued(), None);
    }
}
