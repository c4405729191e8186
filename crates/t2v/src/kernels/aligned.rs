//! Buffers that start on a 64-byte cache line, for the operands that AMX tiles load.
//!
//! Why by hand: a `Vec` of u32 or f32 is only as aligned as its element (the allocator gives 16
//! bytes in practice), and a tile row of 64 bytes that starts off a cache line is two lines to
//! load. `amx_ceiling` on Emerald Rapids (one core, GFLOP/s of the 2×2 block): A in L1 and B in
//! L2, 1,566–2,183 with rows on lines against 618–685 with every row 16 bytes past one; both in
//! L2, 1,580–1,667 against 358–590. No maintained crate gives a zeroed, aligned slice of plain
//! numbers without pulling in an allocator of its own.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The alignment: one cache line, one tile row.
pub const LINE: usize = 64;

/// Numbers whose all-zero bytes are zero and every bit pattern valid (u32, f32).
///
/// # Safety
/// Implementors are plain old data of at most [`LINE`] bytes' alignment.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: plain numbers; zero bytes are 0.
unsafe impl Plain for u32 {}
// SAFETY: as above (zero bytes are +0.0).
unsafe impl Plain for f32 {}

/// A `[T]` starting on a 64-byte line, zeroed when made and where it grows.
pub struct Aligned<T: Plain> {
    ptr: NonNull<T>,
    len: usize,
    /// Elements allocated (≥ len).
    cap: usize,
}

// SAFETY: owns its elements as a Vec would; T is Send + Sync.
unsafe impl<T: Plain> Send for Aligned<T> {}
// SAFETY: as above.
unsafe impl<T: Plain> Sync for Aligned<T> {}

impl<T: Plain> Aligned<T> {
    fn layout(len: usize) -> Layout {
        let bytes = (len * std::mem::size_of::<T>()).next_multiple_of(LINE);
        Layout::from_size_align(bytes, LINE).expect("buffer size")
    }

    /// `len` zeros (fresh pages from the allocator where it can, so no pass of writes).
    pub fn zeroed(len: usize) -> Self {
        Self::allocate(len, true)
    }

    /// `len` elements left as the allocator hands them over, for a buffer whose every element
    /// its maker writes before anything reads it: the zeroing pass of [`Aligned::zeroed`] is a
    /// write of the whole buffer (heap blocks are reused, so `alloc_zeroed` must clear them),
    /// about 3% of a bfloat16 UNet step when a linear layer's packed weight took it.
    ///
    /// # Safety
    /// Every element is written before it is read.
    pub unsafe fn uninit(len: usize) -> Self {
        Self::allocate(len, false)
    }

    fn allocate(len: usize, zeroed: bool) -> Self {
        if len == 0 {
            return Self::default();
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        } as *mut T;
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Aligned { ptr, len, cap: len }
    }

    /// As `Vec::resize(len, 0)`: elements past the old length are zero; the allocation is kept
    /// where it holds `len` (a buffer reused call after call).
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            let mut grown = Self::zeroed(len);
            grown[..self.len].copy_from_slice(self);
            *self = grown;
            return;
        }
        if len > self.len {
            // SAFETY: within the allocation; zero bytes are zero for Plain.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(self.len), 0, len - self.len) };
        }
        self.len = len;
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let mut out = Self::zeroed(values.len());
        out.copy_from_slice(values);
        out
    }
}

impl<T: Plain> Default for Aligned<T> {
    fn default() -> Self {
        // (an aligned dangling pointer: an empty slice never reads it)
        let ptr = NonNull::new(LINE as *mut T).expect("non-null");
        Aligned { ptr, len: 0, cap: 0 }
    }
}

impl<T: Plain> Drop for Aligned<T> {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.cap)) };
        }
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: len initialised elements (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_line_zeroed_and_hold_their_values() {
        for len in [1usize, 15, 16, 17, 1000, 1 << 20] {
            let mut a = Aligned::<u32>::zeroed(len);
            assert_eq!(a.as_ptr() as usize % LINE, 0, "len {len}");
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&x| x == 0));
            a[len - 1] = 7;
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % LINE, 0);
            assert_eq!(b[len - 1], 7);
            assert_eq!(&b[..], &a[..]);
        }
        let f = Aligned::<f32>::from_slice(&[1.5, -2.0]);
        assert_eq!(&f[..], &[1.5, -2.0]);
        let mut grown = Aligned::<u32>::default();
        assert!(grown.is_empty());
        grown.resize(40);
        grown.fill(3);
        grown.resize(20);
        grown.resize(30);
        assert_eq!(&grown[..22], &[[3u32; 20].as_slice(), &[0, 0]].concat()[..]);
        grown.resize(5000);
        assert_eq!(grown.as_ptr() as usize % LINE, 0);
        assert_eq!((grown[19], grown[20], grown[4999]), (3, 0, 0));
        assert_eq!(Aligned::<f32>::zeroed(0).len(), 0);
    }
}
