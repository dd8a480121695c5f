//! Teardown off the hot path: VMs (and anything else) sent here are dropped on a background
//! thread, exactly once, because ownership moves into the channel.

use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

enum Job {
    Drop(Box<dyn Send>),
    Flush(SyncSender<()>),
}

/// A background thread that drops what it is given.
pub(crate) struct Reaper {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    pub(crate) fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("cowvm-reaper".into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Drop(item) => drop(item),
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })?;
        Ok(Reaper {
            tx: Mutex::new(Some(tx)),
            thread: Some(thread),
        })
    }

    /// Drops `item` on the reaper thread (or here, if the reaper has stopped).
    pub(crate) fn drop_later<T: Send + 'static>(&self, item: T) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(Job::Drop(item))) = tx.send(Job::Drop(Box::new(item))) {
                    drop(item);
                }
            }
            None => drop(item),
        }
    }

    /// Returns once everything sent before the call has been dropped.
    pub(crate) fn flush(&self) {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let sent = {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            tx.as_ref().is_some_and(|tx| tx.send(Job::Flush(done_tx)).is_ok())
        };
        if sent {
            let _ = done_rx.recv();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
