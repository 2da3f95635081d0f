//! Connection threads: the broker serves client connections on `[runtime] threads`
//! threads (one per CPU by default), each running its own single-threaded tokio runtime.
//!
//! A connection stays on the thread it was given at accept for its whole life, also when
//! it waits in the parking lot and is resumed ([`Seat::handle`]). A message from a
//! publisher on one thread to a subscriber on another wakes that thread, as a message
//! from one process to another does; everything else a connection does stays on its
//! thread. A multi-threaded, work-stealing runtime moves tasks between its workers and
//! wakes idle workers to look for work: measured on two CPUs, that added about 20 µs to
//! the median publish-to-delivery time (BENCHMARKS.md, unpinned), and it bought no
//! throughput there.
//!
//! The accepting thread (the main one, which also runs the broker's own tasks) gives each
//! new connection to the thread serving the fewest connections, itself included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::Semaphore;

/// The threads that serve connections: the main thread's runtime and those of the extra
/// threads. See the module docs.
#[derive(Debug, Clone)]
pub struct ConnectionThreads {
    handles: Vec<Handle>,
}

/// Ends the extra connection threads when dropped, and waits for them: each thread's
/// runtime stops (any task still on it is dropped) and the thread exits. Drop it after
/// the broker has shut down.
#[derive(Debug)]
pub struct StopThreads {
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    joins: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for StopThreads {
    fn drop(&mut self) {
        self.stop.clear();
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}

impl ConnectionThreads {
    /// Connections on the current runtime only (a library user's runtime, tests).
    pub fn current() -> ConnectionThreads {
        ConnectionThreads {
            handles: vec![Handle::current()],
        }
    }

    /// `main` (the runtime the broker starts on, thread 0) and `extra` more threads
    /// named `bulwark-conn-1`, ..., each with a single-threaded runtime of its own.
    pub fn start(main: Handle, extra: usize) -> std::io::Result<(ConnectionThreads, StopThreads)> {
        let mut handles = vec![main];
        let mut stop = StopThreads {
            stop: Vec::with_capacity(extra),
            joins: Vec::with_capacity(extra),
        };
        for i in 1..=extra {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop.stop.push(tx);
            stop.joins.push(
                std::thread::Builder::new()
                    .name(format!("bulwark-conn-{i}"))
                    .spawn(move || {
                        // Ends when the sender is dropped.
                        let _ = rt.block_on(rx);
                    })?,
            );
        }
        Ok((ConnectionThreads { handles }, stop))
    }

    /// How many threads serve connections.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// One connection thread, as its connections see it.
#[derive(Debug)]
struct Thread {
    /// Its place among the connection threads (0: the main thread).
    index: usize,
    handle: Handle,
    /// Connections it serves (running or parked).
    load: AtomicUsize,
    /// The broker's free seats (`limits.max_connections`), shared by every thread.
    free: Arc<Semaphore>,
}

/// The broker's connection seats: at most `limits.max_connections` connections at once,
/// each on a connection thread.
#[derive(Debug)]
pub struct Seats {
    threads: Vec<Arc<Thread>>,
    free: Arc<Semaphore>,
    max: u32,
}

/// A connection's place in the broker: one of `limits.max_connections` seats, on the
/// thread that serves it. Both are given back when the connection ends (when the seat is
/// dropped).
#[derive(Debug)]
pub struct Seat {
    thread: Arc<Thread>,
}

impl Seats {
    /// `max_connections` seats over `threads`.
    pub fn new(threads: &ConnectionThreads, max_connections: usize) -> Seats {
        let max = u32::try_from(max_connections)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        let free = Arc::new(Semaphore::new(max as usize));
        let threads = threads
            .handles
            .iter()
            .enumerate()
            .map(|(index, handle)| {
                Arc::new(Thread {
                    index,
                    handle: handle.clone(),
                    load: AtomicUsize::new(0),
                    free: free.clone(),
                })
            })
            .collect();
        Seats { threads, free, max }
    }

    /// How many threads serve connections.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Connections each thread serves now, by thread.
    pub fn loads(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.load.load(Ordering::Relaxed))
            .collect()
    }

    /// A seat on the thread serving the fewest connections (the lowest-numbered one on a
    /// tie); `None` when all `limits.max_connections` are taken. Only the accepting
    /// thread takes seats, so the choice and the counts agree.
    pub fn take(&self) -> Option<Seat> {
        self.free.try_acquire().ok()?.forget();
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.load.load(Ordering::Relaxed))
            .expect("at least the main thread")
            .clone();
        thread.load.fetch_add(1, Ordering::Relaxed);
        Some(Seat { thread })
    }

    /// Completes once every seat has been given back (every connection has ended).
    pub async fn all_given_back(&self) {
        let _ = self.free.acquire_many(self.max).await;
    }
}

impl Seat {
    /// The runtime of the thread that serves this connection.
    pub fn handle(&self) -> &Handle {
        &self.thread.handle
    }

    /// Whether the connection is served on the main thread (where it was accepted).
    pub fn on_main_thread(&self) -> bool {
        self.thread.index == 0
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.thread.load.fetch_sub(1, Ordering::Relaxed);
        self.thread.free.add_permits(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[tokio::test]
    async fn seats_go_to_the_least_loaded_thread_and_come_back() {
        let (threads, _stop) = ConnectionThreads::start(Handle::current(), 2).unwrap();
        let seats = Seats::new(&threads, 4);
        assert_eq!(seats.threads(), 3);
        let a = seats.take().unwrap();
        let b = seats.take().unwrap();
        let c = seats.take().unwrap();
        assert_eq!(seats.loads(), vec![1, 1, 1]);
        assert!(a.on_main_thread() && !b.on_main_thread() && !c.on_main_thread());
        drop(b);
        assert_eq!(seats.loads(), vec![1, 0, 1]);
        // The emptied thread is the next one chosen.
        let d = seats.take().unwrap();
        assert_eq!(seats.loads(), vec![1, 1, 1]);
        assert!(!d.on_main_thread());
        // limits.max_connections: 4 seats, then none until one is given back.
        let e = seats.take().unwrap();
        assert!(seats.take().is_none());
        assert_eq!(seats.loads(), vec![2, 1, 1]);
        drop(e);
        let e = seats.take().unwrap();
        // Shutdown waits for every seat.
        let all = seats.all_given_back();
        tokio::pin!(all);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(all.as_mut().poll(&mut cx).is_pending());
        drop((a, c, d, e));
        all.await;
        assert_eq!(seats.loads(), vec![0, 0, 0]);
    }

    #[tokio::test]
    async fn a_seat_runs_its_tasks_on_its_own_thread() {
        let (threads, stop) = ConnectionThreads::start(Handle::current(), 2).unwrap();
        let seats = Seats::new(&threads, 10);
        let mut names = Vec::new();
        let mut taken = Vec::new();
        for _ in 0..3 {
            let seat = seats.take().unwrap();
            let name = seat
                .handle()
                .spawn(async {
                    // A timer and a socket work there: the thread's runtime has its drivers.
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    assert!(l.local_addr().is_ok());
                    std::thread::current().name().map(str::to_string)
                })
                .await
                .unwrap();
            names.push(name);
            taken.push(seat);
        }
        let main = std::thread::current().name().map(str::to_string);
        assert_eq!(
            names,
            vec![
                main,
                Some("bulwark-conn-1".to_string()),
                Some("bulwark-conn-2".to_string())
            ]
        );
        // Once stopped (the drop waits for the threads), a thread's runtime runs no more
        // tasks.
        let extra = taken[1].handle().clone();
        drop(stop);
        let e = extra.spawn(async {}).await.unwrap_err();
        assert!(e.is_cancelled(), "{e}");
    }
}
