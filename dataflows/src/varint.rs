//! Variable-length integers (7 bits a byte, low first) and the zigzag map of signed to
//! unsigned (small magnitudes to small numbers): the compact encodings of the duplicate
//! rule's blocks and of the open hour's packed readings.

/// Appends `v` in as many bytes as its significant 7-bit groups.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads the integer at `*at` and moves `*at` past it.
#[inline]
pub(crate) fn get_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// 0, -1, 1, -2, … as 0, 1, 2, 3, …
#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
#[inline]
pub(crate) fn unzigzag(z: u64) -> i64 {
    (z >> 1) as i64 ^ -((z & 1) as i64)
}
