//! The little DER the project needs to read or write by hand (key re-wrapping, attribute
//! counting): definite-length TLVs only.

/// Reads one DER TLV: (tag, contents, remaining input). Definite lengths only.
pub fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

pub fn der_tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// The elements of a DER SET or SEQUENCE (given as a whole TLV), or `None` if malformed.
pub fn der_elements(tlv: &[u8]) -> Option<Vec<&[u8]>> {
    let (_, mut contents, rest) = der_read(tlv)?;
    if !rest.is_empty() {
        return None;
    }
    let mut elements = Vec::new();
    while !contents.is_empty() {
        let (_, _, next) = der_read(contents)?;
        elements.push(&contents[..contents.len() - next.len()]);
        contents = next;
    }
    Some(elements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let tlv = der_tlv(0x04, &vec![7u8; len]);
            let (tag, body, rest) = der_read(&tlv).unwrap();
            assert_eq!((tag, body.len(), rest.len()), (0x04, len, 0));
        }
    }

    #[test]
    fn lists_the_elements_of_a_set() {
        let set = der_tlv(
            0x31,
            &[der_tlv(0x02, &[1]), der_tlv(0x04, &[2, 3])].concat(),
        );
        let elements = der_elements(&set).unwrap();
        assert_eq!(elements, vec![&[0x02, 1, 1][..], &[0x04, 2, 2, 3][..]]);
        assert!(der_elements(&set[..set.len() - 1]).is_none());
    }
}
