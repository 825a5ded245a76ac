//! The x86-64 vector instruction sets the channels-last kernels run on,
//! behind one trait, so that each kernel is written once.
//!
//! AVX-512F gives 32 registers of 16 lanes; AVX2 with FMA (x86-64 cores
//! since 2013–2015 but Intel's Atom-class ones, and the only choice on
//! Intel's client cores since Alder Lake and on AMD before Zen 4) gives 16
//! registers of 8. A kernel is
//! generic over [`Simd`] and marked `#[inline(always)]`; a thin entry point
//! per instruction set, compiled with that set's `target_feature`, calls it,
//! so the intrinsics inline into code built for the CPU that runs them.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// An instruction set a kernel can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 16-lane vectors, 32 registers.
    Avx512,
    /// AVX2 and FMA: 8-lane vectors, 16 registers.
    Avx2,
}

impl Isa {
    /// The widest set this CPU runs, or `None` (not x86-64, or older than
    /// Haswell), capped at AVX2 where the environment sets
    /// `LINESIDE_ISA=avx2`: to compare the two on one machine, or to keep
    /// an Intel CPU that lowers its clock under AVX-512 at full speed.
    /// Read once per process.
    pub fn detect() -> Option<Self> {
        static CHOSEN: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| Self::widest(&Self::supported(), std::env::var("LINESIDE_ISA").ok().as_deref()))
    }

    /// The first of `sets` (widest first) that `cap`, the value of
    /// `LINESIDE_ISA`, allows.
    fn widest(sets: &[Self], cap: Option<&str>) -> Option<Self> {
        let cap_at_avx2 = cap.is_some_and(|v| v.eq_ignore_ascii_case("avx2"));
        sets.iter().copied().find(|&isa| !(cap_at_avx2 && isa == Self::Avx512))
    }

    /// Every set this CPU runs, widest first (tests check each).
    pub fn supported() -> Vec<Self> {
        let mut sets = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                sets.push(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                sets.push(Self::Avx2);
            }
        }
        sets
    }
}

/// A vector of f32 lanes and the operations the kernels use.
///
/// # Safety
/// Every method requires the CPU to have the instruction set of the
/// implementing type; pointer arguments follow the intrinsics' rules (a
/// masked-off lane is never read or written, so it may lie outside memory).
pub(crate) trait Simd: Copy {
    /// Lanes per vector.
    const LANES: usize;
    /// Which lanes a masked load or store touches.
    type Mask: Copy;

    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// The first `n` lanes (all where `n >= LANES`).
    unsafe fn first(n: usize) -> Self::Mask;
    unsafe fn load(p: *const f32) -> Self;
    /// Zero in the lanes masked off.
    unsafe fn load_masked(m: Self::Mask, p: *const f32) -> Self;
    unsafe fn store(p: *mut f32, v: Self);
    unsafe fn store_masked(m: Self::Mask, p: *mut f32, v: Self);
    /// `a · b + c`, fused.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    unsafe fn min(a: Self, b: Self) -> Self;
}

/// A 16-lane AVX-512F vector.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Zmm(__m512);

#[cfg(target_arch = "x86_64")]
impl Simd for Zmm {
    const LANES: usize = 16;
    type Mask = __mmask16;

    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(unsafe { _mm512_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn first(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn load_masked(m: __mmask16, p: *const f32) -> Self {
        Self(unsafe { _mm512_maskz_loadu_ps(m, p) })
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        unsafe { _mm512_storeu_ps(p, v.0) }
    }
    #[inline(always)]
    unsafe fn store_masked(m: __mmask16, p: *mut f32, v: Self) {
        unsafe { _mm512_mask_storeu_ps(p, m, v.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Self(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self(unsafe { _mm512_add_ps(a.0, b.0) })
    }

    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self(unsafe { _mm512_sub_ps(a.0, b.0) })
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Self(unsafe { _mm512_max_ps(a.0, b.0) })
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Self(unsafe { _mm512_min_ps(a.0, b.0) })
    }
}

/// An 8-lane AVX2 vector (with FMA).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Ymm(__m256);

#[cfg(target_arch = "x86_64")]
impl Simd for Ymm {
    const LANES: usize = 8;
    /// AVX2 masks are vectors: all ones in a lane that is touched.
    type Mask = __m256i;

    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(unsafe { _mm256_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn first(n: usize) -> __m256i {
        let n = n.min(8) as i32;
        unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn load_masked(m: __m256i, p: *const f32) -> Self {
        Self(unsafe { _mm256_maskload_ps(p, m) })
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        unsafe { _mm256_storeu_ps(p, v.0) }
    }
    #[inline(always)]
    unsafe fn store_masked(m: __m256i, p: *mut f32, v: Self) {
        unsafe { _mm256_maskstore_ps(p, m, v.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Self(unsafe { _mm256_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self(unsafe { _mm256_add_ps(a.0, b.0) })
    }

    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self(unsafe { _mm256_sub_ps(a.0, b.0) })
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Self(unsafe { _mm256_max_ps(a.0, b.0) })
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Self(unsafe { _mm256_min_ps(a.0, b.0) })
    }
}

/// `act(x)` in registers: the activations the kernels fuse into their store.
///
/// # Safety
/// As for [`Simd`].
#[inline(always)]
pub(crate) unsafe fn activate<S: Simd>(x: S, act: super::sgemm::Fused) -> S {
    use super::sgemm::Fused;
    unsafe {
        match act {
            Fused::None => x,
            Fused::Relu => S::max(x, S::zero()),
            Fused::Relu6 => S::min(S::max(x, S::zero()), S::splat(6.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Isa::{self, Avx2, Avx512};

    #[test]
    fn avx2_caps_the_choice() {
        assert_eq!(Isa::widest(&[Avx512, Avx2], None), Some(Avx512));
        assert_eq!(Isa::widest(&[Avx512, Avx2], Some("AVX2")), Some(Avx2));
        assert_eq!(Isa::widest(&[Avx512, Avx2], Some("avx512")), Some(Avx512));
        assert_eq!(Isa::widest(&[Avx512], Some("avx2")), None);
        assert_eq!(Isa::widest(&[Avx2], None), Some(Avx2));
        assert_eq!(Isa::widest(&[], None), None);
    }
}
