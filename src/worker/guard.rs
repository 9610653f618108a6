//! Every store call runs under a deadline with its panics caught: an error, a call that never
//! returns and a panic all come out as one [`StoreFailure`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use crate::metrics::StoreFailureReason;
use crate::store::StoreError;

pin_project! {
    /// Polls `inner`, turning a panic inside it into `Err` with the panic's payload.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // The future is dropped by the caller after a panic and never polled again, so no
        // broken invariant inside it can be observed.
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

/// The message of a panic payload (`&str` or `String`, as `panic!` makes them).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// Why a store call failed.
#[derive(Debug)]
pub(crate) enum StoreFailure {
    /// The store returned an error.
    Error(StoreError),
    /// The call did not finish within the store timeout and was dropped.
    Timeout(Duration),
    /// The call panicked.
    Panic(String),
}

impl StoreFailure {
    /// The `reason` label of the failure.
    pub(crate) fn reason(&self) -> StoreFailureReason {
        match self {
            StoreFailure::Error(_) => StoreFailureReason::Error,
            StoreFailure::Timeout(_) => StoreFailureReason::Timeout,
            StoreFailure::Panic(_) => StoreFailureReason::Panic,
        }
    }

    /// The failure as a [`StoreError`], for callers of the public API.
    pub(crate) fn into_error(self) -> StoreError {
        match self {
            StoreFailure::Error(e) => e,
            other => StoreError::new(other.to_string()),
        }
    }
}

impl fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreFailure::Error(e) => match std::error::Error::source(e) {
                Some(source) => write!(f, "{e}: {source}"),
                None => write!(f, "{e}"),
            },
            StoreFailure::Timeout(d) => write!(f, "store call did not finish within {d:?}"),
            StoreFailure::Panic(message) => write!(f, "store call panicked: {message}"),
        }
    }
}

/// Runs a store call under `timeout`, with its panics caught.
pub(crate) async fn guarded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreFailure> {
    match tokio::time::timeout(timeout, CatchUnwind::new(call)).await {
        Err(_elapsed) => Err(StoreFailure::Timeout(timeout)),
        Ok(Err(payload)) => Err(StoreFailure::Panic(panic_message(&*payload))),
        Ok(Ok(Err(error))) => Err(StoreFailure::Error(error)),
        Ok(Ok(Ok(value))) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_error_a_hang_and_a_panic_are_each_one_failure() {
        let t = Duration::from_secs(1);
        let error = guarded::<()>(t, async { Err(StoreError::new("down")) }).await;
        assert!(matches!(error, Err(StoreFailure::Error(_))));
        let hang = guarded::<()>(t, std::future::pending()).await;
        assert!(matches!(hang, Err(StoreFailure::Timeout(d)) if d == t));
        let panic = guarded::<()>(t, async { panic!("store bug {}", 7) }).await;
        match panic {
            Err(StoreFailure::Panic(message)) => assert_eq!(message, "store bug 7"),
            other => panic!("expected a panic failure, got {other:?}"),
        }
        assert_eq!(guarded(t, async { Ok(5) }).await.unwrap(), 5);
    }

    #[test]
    fn a_panic_before_the_first_await_is_caught_too() {
        fn eager() -> impl Future<Output = Result<(), StoreError>> {
            panic!("in the synchronous part of the call");
            #[allow(unreachable_code)]
            async {
                Ok(())
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let result = rt.block_on(guarded(Duration::from_secs(1), async { eager().await }));
        assert!(matches!(result, Err(StoreFailure::Panic(_))));
    }
}
