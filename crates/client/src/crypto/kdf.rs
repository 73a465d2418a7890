//! Key derivation shared by channel records and protected key files: Argon2id parameters and
//! the bounds a decoder enforces on them, HKDF-SHA256 to split one Argon2id output into
//! independent keys, and the length-prefixed field encoding of every v2 input.

use argon2::{Algorithm, Argon2, Params, Version};
use ring::hkdf;

use super::{CryptoError, ParamsError};

/// Argon2id cost parameters, as a v2 channel record or a protected key file carries them.
///
/// Plain data: a decoder checks them against the v2 bounds (see [`Argon2Params::check_v2`])
/// before any memory is spent on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Argon2Params {
    /// Memory, in KiB (Argon2's m). v2 bounds: 19 456 ..= 1 048 576 (19 MiB ..= 1 GiB).
    pub memory_kib: u32,
    /// Passes over the memory (Argon2's t). v2 bounds: 1 ..= 16.
    pub passes: u32,
    /// Lanes (Argon2's p). v2 bounds: 1 ..= 4. This build computes lanes one after another,
    /// so more lanes cost time, not parallelism.
    pub lanes: u32,
}

impl Argon2Params {
    /// The v2 default: OWASP's first choice for Argon2id, 46 MiB (47 104 KiB), 1 pass, 1 lane.
    pub const V2_DEFAULT: Argon2Params = Argon2Params {
        memory_kib: 47_104,
        passes: 1,
        lanes: 1,
    };

    /// The fixed v1 parameters: 19 MiB (19 456 KiB), 2 passes, 1 lane.
    pub const V1: Argon2Params = Argon2Params {
        memory_kib: super::ARGON2_MEMORY_KIB,
        passes: super::ARGON2_PASSES,
        lanes: super::ARGON2_LANES,
    };

    /// Checks the parameters against the v2 bounds: memory 19 MiB ..= 1 GiB, passes 1 ..= 16,
    /// lanes 1 ..= 4, and memory × passes at least v1's 38 912 KiB, so a record can neither
    /// make a client burn unbounded memory and time nor talk it into weak parameters.
    ///
    /// # Errors
    ///
    /// The first bound broken, as a [`ParamsError`].
    pub fn check_v2(&self) -> Result<(), ParamsError> {
        Bounds::V2.check(*self)
    }
}

/// What a decoder accepts. Only [`Bounds::V2`] is used outside tests; unit tests use
/// `Bounds::TEST` so they can derive with tiny parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    memory_kib_min: u32,
    memory_kib_max: u32,
    passes_max: u32,
    lanes_max: u32,
    cost_kib_min: u64,
}

impl Bounds {
    pub(crate) const V2: Bounds = Bounds {
        memory_kib_min: 19_456,
        memory_kib_max: 1 << 20,
        passes_max: 16,
        lanes_max: 4,
        cost_kib_min: 19_456 * 2,
    };

    /// Argon2's own floor is 8 KiB per lane.
    #[cfg(test)]
    pub(crate) const TEST: Bounds = Bounds {
        memory_kib_min: 32,
        memory_kib_max: 1 << 20,
        passes_max: 16,
        lanes_max: 4,
        cost_kib_min: 0,
    };

    pub(crate) fn check(&self, params: Argon2Params) -> Result<(), ParamsError> {
        let Argon2Params {
            memory_kib,
            passes,
            lanes,
        } = params;
        if !(self.memory_kib_min..=self.memory_kib_max).contains(&memory_kib) {
            return Err(ParamsError::Memory {
                found: memory_kib,
                min: self.memory_kib_min,
                max: self.memory_kib_max,
            });
        }
        if !(1..=self.passes_max).contains(&passes) {
            return Err(ParamsError::Passes {
                found: passes,
                max: self.passes_max,
            });
        }
        if !(1..=self.lanes_max).contains(&lanes) {
            return Err(ParamsError::Lanes {
                found: lanes,
                max: self.lanes_max,
            });
        }
        let cost = u64::from(memory_kib) * u64::from(passes);
        if cost < self.cost_kib_min {
            return Err(ParamsError::Cost {
                found: cost,
                min: self.cost_kib_min,
            });
        }
        Ok(())
    }
}

/// Argon2id (version 0x13) of `passphrase` with `salt`, 32 bytes out.
///
/// # Errors
///
/// [`CryptoError::EmptyPassphrase`] for an empty passphrase, [`CryptoError::Derive`] when
/// Argon2 refuses the parameters (callers check them against [`Bounds`] first).
pub(crate) fn argon2id(
    params: Argon2Params,
    passphrase: &str,
    salt: &[u8],
) -> Result<[u8; 32], CryptoError> {
    if passphrase.is_empty() {
        return Err(CryptoError::EmptyPassphrase);
    }
    let params = Params::new(params.memory_kib, params.passes, params.lanes, Some(32))
        .map_err(|e| CryptoError::Derive(e.to_string()))?;
    let mut master = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut master)
        .map_err(|e| CryptoError::Derive(e.to_string()))?;
    Ok(master)
}

/// HKDF-SHA256 (RFC 5869) with an empty salt: extract from `master`, expand with `info` to 32
/// bytes. Different `info` strings give independent keys: knowing one output says nothing
/// about another, or about `master`.
pub(crate) fn hkdf_sha256(master: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(master);
    let mut out = [0u8; 32];
    prk.expand(&[info], hkdf::HKDF_SHA256)
        .expect("32 bytes is far below HKDF-SHA256's limit of 255 * 32")
        .fill(&mut out)
        .expect("the output buffer has the length asked for");
    out
}

/// Appends `part` as `len (u64 LE) || part`, so adjacent variable-length fields cannot run
/// into each other ("ab" + "c" differs from "a" + "bc").
pub(crate) fn put_field(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_le_bytes());
    out.extend_from_slice(part);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_bounds_accept_defaults_and_v1_and_refuse_the_rest() {
        assert_eq!(Argon2Params::V2_DEFAULT.check_v2(), Ok(()));
        assert_eq!(Argon2Params::V1.check_v2(), Ok(()));
        let p = |memory_kib, passes, lanes| Argon2Params {
            memory_kib,
            passes,
            lanes,
        };
        assert!(matches!(
            p((1 << 20) + 1, 1, 1).check_v2(),
            Err(ParamsError::Memory { .. })
        ));
        assert!(matches!(
            p(19_455, 4, 1).check_v2(),
            Err(ParamsError::Memory { .. })
        ));
        assert!(matches!(
            p(47_104, 17, 1).check_v2(),
            Err(ParamsError::Passes { .. })
        ));
        assert!(matches!(
            p(47_104, 0, 1).check_v2(),
            Err(ParamsError::Passes { .. })
        ));
        assert!(matches!(
            p(47_104, 1, 5).check_v2(),
            Err(ParamsError::Lanes { .. })
        ));
        assert!(matches!(
            p(47_104, 1, 0).check_v2(),
            Err(ParamsError::Lanes { .. })
        ));
        assert!(matches!(
            p(19_456, 1, 1).check_v2(),
            Err(ParamsError::Cost { .. })
        ));
    }

    #[test]
    fn hkdf_outputs_differ_by_info() {
        let master = [7u8; 32];
        assert_ne!(hkdf_sha256(&master, b"a"), hkdf_sha256(&master, b"b"));
        assert_eq!(hkdf_sha256(&master, b"a"), hkdf_sha256(&master, b"a"));
    }

    #[test]
    fn fields_do_not_run_into_each_other() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        put_field(&mut a, b"ab");
        put_field(&mut a, b"c");
        put_field(&mut b, b"a");
        put_field(&mut b, b"bc");
        assert_ne!(a, b);
    }
}
