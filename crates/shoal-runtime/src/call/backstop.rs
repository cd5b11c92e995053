//! A timeout that costs nothing for calls that finish in their first poll.
//!
//! Guests are stopped at their deadline by the epoch callback, but that
//! only runs while wasm runs; a guest blocked in an async host call (a WASI
//! sleep, say) needs a timer as a backstop. Most calls never return
//! `Pending` at all, so the timer is armed only the first time the call
//! does, with the deadline fixed when the call started.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// The call did not finish by the backstop deadline.
#[derive(Debug)]
pub(crate) struct Elapsed;

pub(crate) struct Backstop<F> {
    call: Pin<Box<F>>,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future> Backstop<F> {
    pub(crate) fn new(deadline: Instant, call: F) -> Self {
        Self { call: Box::pin(call), deadline, timer: None }
    }
}

impl<F: Future> Future for Backstop<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = self.call.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let deadline = self.deadline;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_ready_call_never_arms_the_timer() {
        let mut backstop = Backstop::new(Instant::now(), async { 7 });
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut backstop).poll(cx))).await;
        assert!(matches!(polled, Poll::Ready(Ok(7))), "ready at once, even past the deadline");
        assert!(backstop.timer.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_call_is_cut_off_at_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(50);
        let blocked = Backstop::new(deadline, std::future::pending::<()>());
        assert!(matches!(blocked.await, Err(Elapsed)));
        assert!(Instant::now() >= deadline);
        let slow_but_in_time = Backstop::new(deadline + Duration::from_secs(1), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            "done"
        });
        assert_eq!(slow_but_in_time.await.unwrap(), "done");
    }
}
