//! The controller's end of the vCPU threads: each vCPU has a command
//! channel and a reply channel of its own, so waiting for one vCPU never
//! takes another's answer, or a VM event, out of turn.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{Killable, SIGRTMIN};

use super::ControlError;
use crate::event::{VcpuCmd, VcpuReply};
use crate::machine::{MachineError, VcpuTarget};
use crate::vstate::vcpu::Attention;
use crate::vstate::vcpu_state::VcpuState;

/// How long to wait for a vCPU to park before kicking it again. A kick can
/// be lost if it lands just before the thread enters KVM_RUN.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// The controller's end of one vCPU thread.
pub struct VcpuHandle {
    cmds: Sender<VcpuCmd>,
    replies: Receiver<VcpuReply>,
    attention: Arc<Attention>,
    call_pending: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    parked: bool,
    /// It made a hypercall and is parking on its own, but its reply has
    /// not been read yet ([`VcpuSet::pause_running`]): read before any
    /// command or resume goes to it.
    parking: bool,
    /// Its hypercall waited while the machine was rolled back to a
    /// checkpoint taken before the call: the call belongs to the discarded
    /// timeline, and its vCPU's state is the checkpoint's, so the call
    /// must not be carried out.
    call_void: bool,
    /// How many of its hypercalls have been served: which call waits, for
    /// [`VcpuSet::waiting_calls`].
    served: u64,
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
        call_pending: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    ) -> Self {
        Self {
            cmds,
            replies,
            attention,
            call_pending,
            thread,
            parked: false,
            parking: false,
            call_void: false,
            served: 0,
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
}

impl VcpuSet {
    /// The set of running vCPU threads; `stop` ends their loops.
    pub fn new(handles: Vec<VcpuHandle>, stop: Arc<AtomicBool>) -> Self {
        Self { handles, stop }
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
            if h.call_pending.load(Ordering::Acquire) {
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
            if !h.call_pending.load(Ordering::Acquire) {
                let _ = h.send(VcpuCmd::Resume);
                h.parked = false;
            }
        }
    }

    /// The hypercall of vCPU `i` has been served: it may run on.
    pub fn call_served(&mut self, i: usize) {
        if let Some(h) = self.handles.get_mut(i) {
            h.served += 1;
            h.call_pending.store(false, Ordering::Release);
        }
    }

    /// For each vCPU, the call that waits now, if one does (named by how
    /// many of its calls were served before it). A checkpoint keeps this:
    /// a vCPU saved while its call waited is put back waiting for that
    /// call's answer, so a rollback there serves the call again.
    pub fn waiting_calls(&self) -> Vec<Option<u64>> {
        self.handles
            .iter()
            .map(|h| h.call_pending.load(Ordering::Acquire).then_some(h.served))
            .collect()
    }

    /// After a rollback to a checkpoint that kept `at_checkpoint`
    /// ([`VcpuSet::waiting_calls`]): every call waiting now that did not
    /// wait then was made after the checkpoint, in the timeline thrown
    /// away, and is voided ([`VcpuSet::take_void`]); one that waited then
    /// too is served as usual, its vCPU being back to waiting for it.
    pub fn void_calls_since(&mut self, at_checkpoint: &[Option<u64>]) {
        for (i, h) in self.handles.iter_mut().enumerate() {
            let waiting = h.call_pending.load(Ordering::Acquire);
            let then = at_checkpoint.get(i).copied().flatten();
            if waiting && then != Some(h.served) {
                h.call_void = true;
            }
        }
    }

    /// Whether vCPU `i`'s waiting hypercall was made in a timeline since
    /// rolled back ([`VcpuSet::void_calls_since`] marks it): then it must
    /// not be served, only let go. Clears the mark.
    pub fn take_void(&mut self, i: usize) -> bool {
        self.handles
            .get_mut(i)
            .is_some_and(|h| std::mem::take(&mut h.call_void))
    }

    /// Whether a vCPU other than `except` has a hypercall waiting.
    pub fn call_pending(&self, except: Option<usize>) -> bool {
        self.handles
            .iter()
            .enumerate()
            .any(|(i, h)| Some(i) != except && h.call_pending.load(Ordering::Acquire))
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
    /// one's `call_pending` flag, for tests of the bookkeeping alone.
    fn handles(n: usize) -> (VcpuSet, Vec<Arc<AtomicBool>>) {
        let mut hs = Vec::new();
        let mut flags = Vec::new();
        for _ in 0..n {
            let (cmds, _) = std::sync::mpsc::channel();
            let (_, replies) = std::sync::mpsc::channel();
            let pending = Arc::new(AtomicBool::new(false));
            let thread = std::thread::spawn(|| {});
            hs.push(VcpuHandle::new(
                cmds,
                replies,
                Arc::new(Attention::default()),
                pending.clone(),
                thread,
            ));
            flags.push(pending);
        }
        (VcpuSet::new(hs, Arc::new(AtomicBool::new(false))), flags)
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
            Arc::new(AtomicBool::new(true)),
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

    /// A call that waited at the checkpoint waits again after a rollback
    /// there and is served; one made after the checkpoint is dropped,
    /// even from a vCPU whose earlier call waited at the checkpoint.
    #[test]
    fn a_rollback_drops_only_the_calls_made_after_its_checkpoint() {
        let (mut set, pending) = handles(3);
        // vCPUs 0 and 1 wait on a call as the checkpoint is taken.
        pending[0].store(true, Ordering::Release);
        pending[1].store(true, Ordering::Release);
        let at_checkpoint = set.waiting_calls();
        assert_eq!(at_checkpoint, vec![Some(0), Some(0), None]);
        // vCPU 0's call is served, and it makes another; vCPU 2 makes
        // its first; vCPU 1's call still waits.
        set.call_served(0);
        pending[0].store(true, Ordering::Release);
        pending[2].store(true, Ordering::Release);
        set.void_calls_since(&at_checkpoint);
        assert!(set.take_void(0), "vCPU 0's second call came after");
        assert!(!set.take_void(1), "vCPU 1's call waited at the checkpoint");
        assert!(set.take_void(2), "vCPU 2's call came after");
        // Taking the mark clears it.
        assert!(!set.take_void(0));
        // A vCPU with no call waiting is never marked.
        set.call_served(2);
        set.void_calls_since(&at_checkpoint);
        assert!(!set.take_void(2));
    }
}
