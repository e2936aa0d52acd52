//! [`Activation`]: the GPU backend's f32 activation buffers, and the pool that hands a decode
//! loop the same buffers at every step (CUDA graphs replay only on equal addresses).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

/// An f32 activation on the GPU (`CudaBackend`'s `Backend::Act`). Buffers from
/// `Backend::zeros` go back to the backend's pool when dropped and are handed out again for
/// the same length, so that the steps of a decode loop work at the same addresses (a CUDA
/// graph replays only when its ops' addresses are equal; see `graph.rs`). One made with
/// `From<CudaSlice<f32>>` is freed as usual.
pub struct Activation {
    buf: Option<CudaSlice<f32>>,
    pool: Option<Arc<Mutex<ActivationPool>>>,
}

impl Deref for Activation {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        self.buf.as_ref().expect("present until drop")
    }
}

impl DerefMut for Activation {
    fn deref_mut(&mut self) -> &mut CudaSlice<f32> {
        self.buf.as_mut().expect("present until drop")
    }
}

impl Activation {
    /// A buffer from `pool` that goes back to it when dropped.
    pub(crate) fn pooled(buf: CudaSlice<f32>, pool: &Arc<Mutex<ActivationPool>>) -> Activation {
        Activation {
            buf: Some(buf),
            pool: Some(pool.clone()),
        }
    }
}

impl From<CudaSlice<f32>> for Activation {
    fn from(buf: CudaSlice<f32>) -> Activation {
        Activation {
            buf: Some(buf),
            pool: None,
        }
    }
}

impl Drop for Activation {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buf.take(), &self.pool) {
            pool.lock().unwrap_or_else(|e| e.into_inner()).put(buf);
        }
    }
}

/// Activation buffers returned by their owners, by length: kept while consecutive steps have
/// the same number of rows (a decode loop then reuses the same buffers, in the same order:
/// the forward pass drops them in the reverse of their allocation order), dropped into CUDA's
/// stream-ordered pool when the shape changes, so that the pool never holds more than the
/// driver's own pool would.
#[derive(Default)]
pub(crate) struct ActivationPool {
    free: HashMap<usize, Vec<CudaSlice<f32>>>,
    rows: usize,
}

impl ActivationPool {
    pub(crate) fn take(&mut self, len: usize) -> Option<CudaSlice<f32>> {
        self.free.get_mut(&len)?.pop()
    }

    fn put(&mut self, buf: CudaSlice<f32>) {
        self.free.entry(buf.len()).or_default().push(buf);
    }

    /// A new step of `rows` rows.
    pub(crate) fn next_step(&mut self, rows: usize) {
        if rows != self.rows {
            self.free.clear();
            self.rows = rows;
        }
    }
}
