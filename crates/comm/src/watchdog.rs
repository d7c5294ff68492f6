//! The bounded wait every NCCL call goes through, as pure logic over [`Pollable`] so it is
//! tested on the CPU with a scripted fake.
//!
//! NCCL communicators are made non-blocking (`ncclConfig_t.blocking = 0`): every call returns
//! at once, with `ncclSuccess` or `ncclInProgress`, and the work goes on behind it. The wait
//! then polls the communicator's state (`ncclCommGetAsyncError`: in progress, ready, or an
//! error) and, for an operation on a stream, whether the stream's work finished
//! (`cuStreamQuery`), yielding the core and then napping between polls, until the work is
//! done, something fails, or the deadline passes. On a failure or at the deadline it aborts
//! the communicator (`ncclCommAbort`) once and returns [`CommError::Device`] or
//! [`CommError::DeviceTimeout`], so a dead peer becomes the same kind of clear error as with
//! the TCP collective, never a hang. After that the [`Watchdog`] is broken: every later call
//! fails at once, without touching the aborted communicator again.

use std::time::{Duration, Instant};

use crate::CommError;

/// How long a wait yields the core between polls before it starts to sleep: a GPU
/// collective between ranks on one node takes tens of microseconds, and waking from a
/// sleep would add the scheduler's latency to each of a step's many all-reduces.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(2);

/// The longest sleep between two polls once the spin is over, so a long wait (a pipeline
/// receive that waits for a whole stage) costs little CPU and returns at most this late.
pub const DEFAULT_MAX_NAP: Duration = Duration::from_micros(250);

/// The first sleep after the spin; each further one doubles, up to the max nap.
const FIRST_NAP: Duration = Duration::from_micros(10);

/// The communicator's state, as `ncclCommGetAsyncError` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// `ncclInProgress`: an init, finalize, or enqueue is still under way.
    Pending,
    /// `ncclSuccess`: nothing pending on the host side (the stream may still be running).
    Ready,
    /// Any error, with what NCCL said about it.
    Failed(String),
}

/// What a wait waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The communicator is ready: init and finalize, which put nothing on a stream.
    Ready,
    /// The communicator is ready and the stream has finished all its work (an operation
    /// enqueued on it, and everything before).
    StreamDone,
}

/// One communicator and its stream, as the watchdog sees them. The NCCL implementation
/// calls `ncclCommGetAsyncError`, `cuStreamQuery` and `ncclCommAbort`; tests script them.
pub trait Pollable {
    /// The communicator's state.
    fn async_error(&mut self) -> Progress;
    /// Whether the stream has finished its work: `Ok(false)` while it runs, `Err` with the
    /// CUDA error when the stream (or its context) failed.
    fn stream_done(&mut self) -> Result<bool, String>;
    /// Aborts the communicator: NCCL stops its kernels and frees it. Called at most once.
    fn abort(&mut self);
}

/// The deadline and pacing of every wait on one communicator, and whether it was aborted.
#[derive(Debug, Clone)]
pub struct Watchdog {
    /// This process's rank in the group, for error messages.
    rank: usize,
    /// How long one call (its enqueue and its wait) may take.
    timeout: Duration,
    /// How long a wait yields between polls before it sleeps (see [`DEFAULT_SPIN`]).
    spin: Duration,
    /// The longest sleep between polls (see [`DEFAULT_MAX_NAP`]).
    max_nap: Duration,
    /// Why the communicator was aborted, once it was: later calls fail with this at once.
    broken: Option<String>,
}

impl Watchdog {
    /// A watchdog for rank `rank` whose every wait ends by `timeout`.
    pub fn new(rank: usize, timeout: Duration) -> Self {
        Self { rank, timeout, spin: DEFAULT_SPIN, max_nap: DEFAULT_MAX_NAP, broken: None }
    }

    /// Sets how long a wait yields between polls before it sleeps, and its longest sleep.
    pub fn with_pacing(mut self, spin: Duration, max_nap: Duration) -> Self {
        self.spin = spin;
        self.max_nap = max_nap;
        self
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Why the communicator was aborted, if it was.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// `Ok` while the communicator is usable; once it was aborted, the error every call on
    /// it returns (naming what aborted it), so a caller can fail before any other work.
    pub fn check(&self, op: &str) -> Result<(), CommError> {
        match &self.broken {
            None => Ok(()),
            Some(reason) => Err(CommError::Device {
                rank: self.rank,
                op: op.to_string(),
                message: format!("the communicator was aborted earlier ({reason}) and cannot be used again; reload to make a new one"),
            }),
        }
    }

    /// Runs one NCCL call: `start` issues it (it returns `Err` when NCCL refused it at
    /// once), then the wait polls `p` until `until` holds, an error shows, or the deadline
    /// (`timeout` after the call began) passes. A failure or the deadline aborts the
    /// communicator, once; a call on an aborted one fails at once, and neither `start` nor
    /// `p` is touched. `op` names the call in errors ("all_reduce", "send to rank 1").
    pub fn run<P: Pollable + ?Sized>(&mut self, p: &mut P, op: &str, until: Until, start: impl FnOnce(&mut P) -> Result<(), String>) -> Result<(), CommError> {
        self.check(op)?;
        let began = Instant::now();
        let deadline = began + self.timeout;
        if let Err(message) = start(p) {
            return Err(self.fail(p, op, message));
        }
        let mut nap = FIRST_NAP;
        loop {
            match p.async_error() {
                Progress::Failed(message) => return Err(self.fail(p, op, message)),
                Progress::Pending => {}
                Progress::Ready => match until {
                    Until::Ready => return Ok(()),
                    Until::StreamDone => match p.stream_done() {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(message) => return Err(self.fail(p, op, message)),
                    },
                },
            }
            let now = Instant::now();
            if now >= deadline {
                self.broken = Some(format!("{op} did not finish within {:?}", self.timeout));
                p.abort();
                return Err(CommError::DeviceTimeout { rank: self.rank, op: op.to_string(), timeout: self.timeout });
            }
            if now - began < self.spin {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(deadline - now));
                nap = (nap * 2).min(self.max_nap.max(FIRST_NAP));
            }
        }
    }

    /// Aborts the communicator after an error and says so in the error.
    fn fail<P: Pollable + ?Sized>(&mut self, p: &mut P, op: &str, message: String) -> CommError {
        self.broken = Some(format!("{op} failed: {message}"));
        p.abort();
        CommError::Device { rank: self.rank, op: op.to_string(), message: format!("{message}; the communicator was aborted (reload to make a new one)") }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A communicator that answers from scripts; the last answer of each repeats forever.
    struct Fake {
        states: VecDeque<Progress>,
        stream: VecDeque<Result<bool, String>>,
        state_polls: usize,
        stream_polls: usize,
        aborts: usize,
    }

    impl Fake {
        fn new(states: &[Progress], stream: &[Result<bool, String>]) -> Self {
            Self { states: states.iter().cloned().collect(), stream: stream.iter().cloned().collect(), state_polls: 0, stream_polls: 0, aborts: 0 }
        }
    }

    fn next<T: Clone>(q: &mut VecDeque<T>) -> T {
        if q.len() > 1 {
            q.pop_front().expect("not empty")
        } else {
            q.front().cloned().expect("a script with at least one answer")
        }
    }

    impl Pollable for Fake {
        fn async_error(&mut self) -> Progress {
            assert_eq!(self.aborts, 0, "polled an aborted communicator");
            self.state_polls += 1;
            next(&mut self.states)
        }
        fn stream_done(&mut self) -> Result<bool, String> {
            assert_eq!(self.aborts, 0, "queried the stream of an aborted communicator");
            self.stream_polls += 1;
            next(&mut self.stream)
        }
        fn abort(&mut self) {
            self.aborts += 1;
        }
    }

    const SHORT: Duration = Duration::from_millis(20);

    fn dog() -> Watchdog {
        Watchdog::new(3, SHORT).with_pacing(Duration::from_micros(50), Duration::from_micros(100))
    }

    fn ok(_: &mut Fake) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn an_operation_finishes_once_the_communicator_is_ready_and_the_stream_is_done() {
        let mut fake = Fake::new(&[Progress::Pending, Progress::Pending, Progress::Ready], &[Ok(false), Ok(false), Ok(true)]);
        let mut w = dog();
        w.run(&mut fake, "all_reduce", Until::StreamDone, ok).unwrap();
        assert_eq!(fake.aborts, 0, "no abort on success");
        assert_eq!(fake.state_polls, 5, "two pending, then ready with the stream running twice, then done");
        assert_eq!(fake.stream_polls, 3, "the stream is queried only once the communicator is ready");
        assert!(w.broken().is_none());
        w.check("all_reduce").unwrap();
        // The communicator is still usable.
        let mut again = Fake::new(&[Progress::Ready], &[Ok(true)]);
        w.run(&mut again, "all_reduce", Until::StreamDone, ok).unwrap();
    }

    #[test]
    fn an_init_waits_for_ready_without_querying_the_stream() {
        let mut fake = Fake::new(&[Progress::Pending, Progress::Ready], &[Err("must not be queried".into())]);
        dog().run(&mut fake, "init", Until::Ready, ok).unwrap();
        assert_eq!((fake.state_polls, fake.stream_polls, fake.aborts), (2, 0, 0));
    }

    #[test]
    fn an_async_error_surfaces_with_its_message_and_aborts_once() {
        let nccl = "ncclRemoteError: remote process exited or there was a network error";
        let mut fake = Fake::new(&[Progress::Pending, Progress::Failed(nccl.into())], &[Ok(false)]);
        let mut w = dog();
        let err = w.run(&mut fake, "recv from rank 1", Until::StreamDone, ok).unwrap_err();
        match &err {
            CommError::Device { rank, op, message } => {
                assert_eq!((*rank, op.as_str()), (3, "recv from rank 1"));
                assert!(message.starts_with(nccl), "{message}");
                assert!(message.contains("aborted"), "{message}");
            }
            other => panic!("expected a device error, got {other:?}"),
        }
        assert_eq!(fake.aborts, 1);
        assert!(err.to_string().starts_with("NCCL recv from rank 1 on rank 3 failed: ncclRemoteError"), "{err}");
    }

    #[test]
    fn an_error_that_shows_while_the_stream_runs_is_not_missed() {
        let mut fake = Fake::new(&[Progress::Ready, Progress::Ready, Progress::Failed("ncclSystemError".into())], &[Ok(false)]);
        let err = dog().run(&mut fake, "all_reduce", Until::StreamDone, ok).unwrap_err();
        assert!(matches!(&err, CommError::Device { message, .. } if message.starts_with("ncclSystemError")), "{err}");
        assert_eq!((fake.stream_polls, fake.aborts), (2, 1));
    }

    #[test]
    fn a_never_finishing_peer_is_aborted_at_the_deadline_with_an_error_naming_it() {
        let mut fake = Fake::new(&[Progress::Pending], &[Ok(false)]);
        let mut w = dog();
        let began = Instant::now();
        let err = w.run(&mut fake, "all_reduce", Until::StreamDone, ok).unwrap_err();
        assert!(began.elapsed() >= SHORT, "gave up before the deadline: {:?}", began.elapsed());
        assert!(matches!(&err, CommError::DeviceTimeout { rank: 3, op, timeout } if op == "all_reduce" && *timeout == SHORT), "{err:?}");
        assert!(err.to_string().contains("did not finish within 20ms"), "{err}");
        assert_eq!(fake.aborts, 1, "abort is called exactly once");
        assert!(fake.state_polls > 1, "it polled until the deadline");
        assert!(w.broken().is_some_and(|b| b.contains("within 20ms")), "{:?}", w.broken());
    }

    #[test]
    fn a_stream_that_never_drains_times_out_too() {
        let mut fake = Fake::new(&[Progress::Ready], &[Ok(false)]);
        let err = dog().run(&mut fake, "send to rank 2", Until::StreamDone, ok).unwrap_err();
        assert!(matches!(&err, CommError::DeviceTimeout { op, .. } if op == "send to rank 2"), "{err:?}");
        assert_eq!(fake.aborts, 1);
    }

    #[test]
    fn after_an_abort_every_call_fails_at_once_without_a_second_abort() {
        let mut fake = Fake::new(&[Progress::Pending], &[Ok(false)]);
        let mut w = dog();
        assert!(matches!(w.run(&mut fake, "all_reduce", Until::StreamDone, ok), Err(CommError::DeviceTimeout { .. })));
        assert_eq!(fake.aborts, 1);
        // The aborted communicator would now report an error; nothing may touch it again.
        fake.states = [Progress::Failed("ncclInvalidUsage".into())].into_iter().collect();
        let polls = fake.state_polls;
        let mut started = false;
        let err = w
            .run(&mut fake, "barrier", Until::StreamDone, |_| {
                started = true;
                Ok(())
            })
            .unwrap_err();
        assert!(!started, "an aborted communicator must not be handed new work");
        assert_eq!((fake.aborts, fake.state_polls), (1, polls), "no second abort, no poll");
        assert!(
            matches!(&err, CommError::Device { op, message, .. } if op == "barrier" && message.contains("aborted earlier (all_reduce did not finish within 20ms)")),
            "{err}"
        );
        assert_eq!(w.check("send to rank 1").unwrap_err().to_string(), err.to_string().replace("barrier", "send to rank 1"));
    }

    #[test]
    fn a_call_nccl_refuses_at_once_aborts_and_is_not_waited_for() {
        let mut fake = Fake::new(&[Progress::Pending], &[Ok(false)]);
        let mut w = dog();
        let err = w.run(&mut fake, "all_gather", Until::StreamDone, |_| Err("ncclInvalidArgument".into())).unwrap_err();
        assert!(matches!(&err, CommError::Device { message, .. } if message.starts_with("ncclInvalidArgument")), "{err}");
        assert_eq!((fake.state_polls, fake.aborts), (0, 1));
        // And an error after that abort does not abort again.
        assert!(w.run(&mut fake, "all_gather", Until::StreamDone, ok).is_err());
        assert_eq!(fake.aborts, 1);
    }

    #[test]
    fn a_cuda_error_on_the_stream_aborts_and_names_the_cuda_error() {
        let mut fake = Fake::new(&[Progress::Ready], &[Ok(false), Err("CUDA_ERROR_ILLEGAL_ADDRESS".into())]);
        let err = dog().run(&mut fake, "all_reduce", Until::StreamDone, ok).unwrap_err();
        assert!(err.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{err}");
        assert_eq!(fake.aborts, 1);
    }
}
