//! Idle connections without a task of their own.
//!
//! Most connections of a plant's gateways are idle most of the time: a publish every few
//! seconds, a PINGREQ now and then. A tokio task per connection keeps its whole state
//! machine, the futures it waits on and a reactor registration in memory while it waits,
//! several times what the connection's own state needs. A connection that has had
//! nothing to do for `limits.park_idle_after_ms` therefore gives its socket to the
//! [`ParkingLot`]: one thread with its own epoll set, where a parked socket costs no
//! user-space memory. The connection's state waits in a map until something happens:
//! the socket becomes readable (or closed), a message is queued for the session, the
//! session is taken over or kicked, its keepalive runs out, or the broker shuts down.
//! Then it gets a task again and carries on where it left off.
//!
//! [`Signals`] are the wake-ups a connection waits on (deliveries, kick). It works with any
//! waker, so the same signal wakes a running connection task or a parked connection.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

/// What a connection waits for besides its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Wakeup {
    /// Messages were queued for the session.
    Deliveries = 1,
    /// The session was taken over, or the connection is to be closed.
    Kick = 2,
}

/// The wake-ups of one connection, each with one stored permit (like
/// `tokio::sync::Notify::notify_one`), and one waker: the connection's task while it runs,
/// the signals themselves while it is parked (waking them resumes the connection in the
/// lot named by `parked_in`: no waker of its own per parked connection). One per
/// attachment of a connection to its session: a takeover gives the new connection new
/// signals, so that a kick meant for the old one cannot reach it.
#[derive(Debug, Default)]
pub struct Signals {
    set: AtomicU8,
    /// The id of the lot the connection is parked in; 0 while it has a task.
    parked_in: AtomicU32,
    waker: AtomicWaker,
}

/// A parked connection's signals wake the connection's lot.
impl Wake for Signals {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let lot = self.parked_in.load(Ordering::Acquire);
        if lot == 0 {
            return;
        }
        let lot = LOTS
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(lot as usize - 1)
            .and_then(Weak::upgrade);
        if let Some(lot) = lot {
            lot.unpark(key_of(self));
        }
    }
}

/// The parking lots started in this process (one per broker), by id - 1: how parked
/// signals find their lot. An entry outlives its lot as a dead `Weak`.
static LOTS: RwLock<Vec<Weak<dyn Unpark>>> = RwLock::new(Vec::new());

/// A lot, as signals see it.
trait Unpark: Send + Sync {
    fn unpark(&self, key: usize);
}

/// A parked connection's key in its lot (and its epoll token): the address of its
/// signals, which the connection keeps alive while parked.
fn key_of(signals: &Arc<Signals>) -> usize {
    Arc::as_ptr(signals) as usize
}

impl Signals {
    /// Sets the permit of `w` and wakes whoever waits. A permit already set was set with
    /// a wake-up that the connection has not answered yet: no second one (a publish to
    /// many subscribers that are still sending the last one costs an atomic operation
    /// each, not a wake-up).
    pub fn notify(&self, w: Wakeup) {
        // What the permit announces (queued messages, a takeover) is kept under the
        // router's lock, which the connection takes to act on it: a permit seen set needs
        // no locked operation either.
        if self.set.load(Ordering::Acquire) & w as u8 != 0 {
            return;
        }
        if self.set.fetch_or(w as u8, Ordering::AcqRel) & w as u8 == 0 {
            self.waker.wake();
        }
    }

    /// Whether the permit of `w` is set (one load: the connection asks before every
    /// packet).
    pub fn is_set(&self, w: Wakeup) -> bool {
        self.set.load(Ordering::Acquire) & w as u8 != 0
    }

    /// Takes the permit of `w` if it is set; `true` if it was. A permit that is not set
    /// costs a load, not a locked operation.
    pub fn take(&self, w: Wakeup) -> bool {
        self.is_set(w) && self.set.fetch_and(!(w as u8), Ordering::AcqRel) & w as u8 != 0
    }

    /// Takes the permit of `w`, or registers the task to be woken when a permit is set.
    pub fn poll_take(&self, w: Wakeup, cx: &mut Context<'_>) -> Poll<()> {
        if self.take(w) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.take(w) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Completes when the permit of `w` is set (and takes it).
    pub async fn notified(&self, w: Wakeup) {
        std::future::poll_fn(|cx| self.poll_take(w, cx)).await
    }

    /// Registers `waker` without taking a permit; `true` if any permit is set.
    fn watch(&self, waker: &Waker) -> bool {
        self.waker.register(waker);
        self.set.load(Ordering::Acquire) != 0
    }
}

/// What the parking lot keeps of a parked connection.
pub trait Parked: Send + 'static {
    /// The socket to watch for readability.
    fn fd(&self) -> RawFd;
    /// The signals that end the parking besides the socket.
    fn signals(&self) -> Arc<Signals>;
    /// When the connection must be looked at even if nothing happens (its keepalive).
    fn deadline(&self) -> Option<Instant>;
    /// Gives the connection a task again. Called inside the broker's runtime context.
    fn resume(self);
}

/// Idle connections without tasks, watched by one thread. See the module docs.
pub struct ParkingLot<P: Parked> {
    /// This lot's place in [`LOTS`] (+ 1).
    id: u32,
    registry: mio::Registry,
    waker: mio::Waker,
    /// By [`key_of`] their signals.
    parked: Mutex<HashMap<usize, P>>,
    closed: AtomicBool,
    runtime: tokio::runtime::Handle,
}

impl<P: Parked> std::fmt::Debug for ParkingLot<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkingLot")
            .field("parked", &self.len())
            .finish()
    }
}

/// The token of the lot's own wake-up (close).
const WAKE_TOKEN: Token = Token(usize::MAX);
/// How often the lot looks for parked connections whose keepalive ran out.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

impl<P: Parked> Unpark for ParkingLot<P> {
    fn unpark(&self, key: usize) {
        ParkingLot::unpark(self, key)
    }
}

impl<P: Parked> ParkingLot<P> {
    /// Starts the lot's thread. Must be called inside the runtime that resumed
    /// connections run on.
    pub fn start() -> std::io::Result<Arc<ParkingLot<P>>> {
        let poll = mio::Poll::new()?;
        let mut lots = LOTS.write().unwrap_or_else(|e| e.into_inner());
        let lot = Arc::new(ParkingLot {
            id: u32::try_from(lots.len() + 1)
                .map_err(|_| std::io::Error::other("too many parking lots"))?,
            registry: poll.registry().try_clone()?,
            waker: mio::Waker::new(poll.registry(), WAKE_TOKEN)?,
            parked: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        });
        let weak = Arc::downgrade(&lot);
        lots.push(weak.clone());
        drop(lots);
        std::thread::Builder::new()
            .name("bulwark-park".into())
            .spawn(move || watch(poll, weak))?;
        Ok(lot)
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, P>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks a connection. `Err` gives it back when the lot is closed or the socket
    /// cannot be watched: the caller goes on serving it with a task.
    pub fn park(self: &Arc<Self>, p: P) -> Result<(), P> {
        if self.closed.load(Ordering::Acquire) {
            return Err(p);
        }
        let fd = p.fd();
        let signals = p.signals();
        let key = key_of(&signals);
        {
            // Registered under the lock, so that readiness reported at once finds the
            // connection in the map.
            let mut parked = self.lock();
            if self
                .registry
                .register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
                .is_err()
            {
                return Err(p);
            }
            parked.insert(key, p);
        }
        // Outside the lock: registering a waker may wake it at once (a concurrent notify),
        // and waking unparks, which takes the lock.
        signals.parked_in.store(self.id, Ordering::Release);
        let signalled = signals.watch(&Waker::from(signals.clone()));
        // A signal set before its waker was ours: resume at once. Readiness that came
        // before the registration is reported by epoll itself.
        if signalled || self.closed.load(Ordering::Acquire) {
            self.unpark(key);
        }
        Ok(())
    }

    /// Gives a parked connection its task back (no-op if it has already gone).
    fn unpark(&self, key: usize) {
        let Some(p) = self.lock().remove(&key) else {
            return;
        };
        self.resume(p);
    }

    fn resume(&self, p: P) {
        let _ = self.registry.deregister(&mut SourceFd(&p.fd()));
        // The signals no longer lead here, and no longer hold a waker of their own (which
        // would keep them alive if the task ended before registering its waker).
        let signals = p.signals();
        signals.parked_in.store(0, Ordering::Release);
        drop(signals.waker.take());
        let _guard = self.runtime.enter();
        p.resume();
    }

    /// Parks no more connections and resumes every parked one (broker shutdown: they
    /// see the shutdown and close).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let all: Vec<P> = self.lock().drain().map(|(_, p)| p).collect();
        for p in all {
            self.resume(p);
        }
        let _ = self.waker.wake();
    }

    /// Resumes the parked connections whose deadline has passed.
    fn sweep(&self, now: Instant) {
        let due: Vec<P> = {
            let mut parked = self.lock();
            let keys: Vec<usize> = parked
                .iter()
                .filter(|(_, p)| p.deadline().is_some_and(|d| d <= now))
                .map(|(t, _)| *t)
                .collect();
            keys.iter().filter_map(|k| parked.remove(k)).collect()
        };
        for p in due {
            self.resume(p);
        }
    }
}

/// The lot's thread: resumes connections whose socket turned readable, and sweeps for
/// expired keepalives. Ends when the lot is closed or dropped.
fn watch<P: Parked>(mut poll: mio::Poll, lot: Weak<ParkingLot<P>>) {
    let mut events = Events::with_capacity(256);
    let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
    loop {
        let timeout = next_sweep.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "parking lot: epoll_wait failed; idle connections are resumed");
                if let Some(lot) = lot.upgrade() {
                    lot.close();
                }
                return;
            }
        }
        let Some(lot) = lot.upgrade() else {
            return;
        };
        for event in events.iter() {
            if event.token() != WAKE_TOKEN {
                lot.unpark(event.token().0);
            }
        }
        if lot.closed.load(Ordering::Acquire) {
            lot.close();
            return;
        }
        let now = Instant::now();
        if now >= next_sweep {
            lot.sweep(now);
            next_sweep = now + SWEEP_INTERVAL;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use tokio::sync::mpsc;

    struct Conn {
        stream: TcpStream,
        signals: Arc<Signals>,
        deadline: Option<Instant>,
        resumed: mpsc::UnboundedSender<&'static str>,
        label: &'static str,
    }

    impl Parked for Conn {
        fn fd(&self) -> RawFd {
            self.stream.as_raw_fd()
        }
        fn signals(&self) -> Arc<Signals> {
            self.signals.clone()
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn resume(self) {
            // Resumed inside the runtime: spawning works from the lot's thread too.
            let tx = self.resumed.clone();
            let label = self.label;
            tokio::spawn(async move {
                let _ = tx.send(label);
            });
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (s, c)
    }

    fn conn(
        stream: TcpStream,
        tx: &mpsc::UnboundedSender<&'static str>,
        label: &'static str,
        deadline: Option<Instant>,
    ) -> (Conn, Arc<Signals>) {
        let signals = Arc::new(Signals::default());
        (
            Conn {
                stream,
                signals: signals.clone(),
                deadline,
                resumed: tx.clone(),
                label,
            },
            signals,
        )
    }

    #[tokio::test]
    async fn parked_connections_resume_on_data_signal_deadline_and_close() {
        let lot = ParkingLot::<Conn>::start().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (s1, mut c1) = pair();
        let (s2, _c2) = pair();
        let (s3, _c3) = pair();
        let (s4, _c4) = pair();
        let (a, _) = conn(s1, &tx, "data", None);
        let (b, sig_b) = conn(s2, &tx, "signal", None);
        let (c, _) = conn(
            s3,
            &tx,
            "deadline",
            Some(Instant::now() + Duration::from_millis(300)),
        );
        let (d, _) = conn(s4, &tx, "close", None);
        for p in [a, b, c, d] {
            assert!(lot.park(p).is_ok());
        }
        assert_eq!(lot.len(), 4);

        c1.write_all(b"x").unwrap();
        assert_eq!(rx.recv().await, Some("data"));
        sig_b.notify(Wakeup::Kick);
        assert_eq!(rx.recv().await, Some("signal"));
        assert_eq!(rx.recv().await, Some("deadline"));
        assert_eq!(lot.len(), 1);
        // A second wake of an already resumed connection does nothing.
        sig_b.notify(Wakeup::Deliveries);
        lot.close();
        assert_eq!(rx.recv().await, Some("close"));
        assert!(lot.is_empty());
        let (s5, _c5) = pair();
        let (e, _) = conn(s5, &tx, "after-close", None);
        assert!(lot.park(e).is_err(), "a closed lot parks nothing");
    }

    #[tokio::test]
    async fn a_signal_set_before_parking_resumes_at_once() {
        let lot = ParkingLot::<Conn>::start().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (s, _c) = pair();
        let (p, sig) = conn(s, &tx, "early", None);
        sig.notify(Wakeup::Deliveries);
        assert!(lot.park(p).is_ok());
        assert_eq!(rx.recv().await, Some("early"));
        assert!(lot.is_empty());
        // The permit is still there for the resumed task to take.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sig.poll_take(Wakeup::Kick, &mut cx).is_pending());
        assert!(sig.poll_take(Wakeup::Deliveries, &mut cx).is_ready());
        assert!(sig.poll_take(Wakeup::Deliveries, &mut cx).is_pending());
    }

    #[tokio::test]
    async fn a_socket_readable_before_parking_resumes_at_once() {
        let lot = ParkingLot::<Conn>::start().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (s, mut c) = pair();
        c.write_all(b"already here").unwrap();
        // Wait until the byte has arrived on the server side.
        let mut probe = [0u8; 1];
        while s.peek(&mut probe).is_err() {
            std::thread::yield_now();
        }
        let (p, _) = conn(s, &tx, "readable", None);
        assert!(lot.park(p).is_ok());
        assert_eq!(rx.recv().await, Some("readable"));
    }
}
