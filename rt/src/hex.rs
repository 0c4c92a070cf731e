//! Lowercase hex, the one way Turnout writes bytes as text (digests, key
//! ids, token hashes, request hashes).

/// `bytes` as lowercase hex.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    ::hex::encode(bytes)
}

/// Lowercase or uppercase hex back to bytes.
pub fn decode(text: &str) -> Result<Vec<u8>, ::hex::FromHexError> {
    ::hex::decode(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_lowercase() {
        assert_eq!(super::encode([0x00, 0xab, 0xff]), "00abff");
        assert_eq!(super::decode("00abff").unwrap(), vec![0x00, 0xab, 0xff]);
        assert!(super::decode("0g").is_err());
    }
}
