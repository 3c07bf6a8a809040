//! The few pieces of STUN (RFC 8489) and TURN (RFC 8656) the `calls --turn` comparison
//! needs: requests with long-term credentials, the attributes that carry addresses, and
//! ChannelData framing. Enough to drive coturn, not a general implementation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;

pub const ALLOCATE: u16 = 0x0003;
pub const CREATE_PERMISSION: u16 = 0x0008;
pub const CHANNEL_BIND: u16 = 0x0009;

/// Message classes, as they sit in the type field.
const CLASS_SUCCESS: u16 = 0x0100;
const CLASS_ERROR: u16 = 0x0110;
const CLASS_MASK: u16 = 0x0110;

const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// REQUESTED-TRANSPORT's protocol number for UDP.
const TRANSPORT_UDP: u8 = 17;
/// MESSAGE-INTEGRITY: attribute header plus an HMAC-SHA1.
const INTEGRITY_LEN: usize = 4 + 20;

/// The long-term credential key: MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    Md5::digest(format!("{username}:{realm}:{password}")).into()
}

/// A request being built; attributes are appended in order.
pub struct Request {
    bytes: Vec<u8>,
}

impl Request {
    pub fn new(method: u16, transaction: [u8; 12]) -> Self {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&method.to_be_bytes());
        bytes.extend_from_slice(&0u16.to_be_bytes());
        bytes.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        bytes.extend_from_slice(&transaction);
        Request { bytes }
    }

    fn attribute(mut self, kind: u16, value: &[u8]) -> Self {
        self.bytes.extend_from_slice(&kind.to_be_bytes());
        self.bytes
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(value);
        // Attributes are padded to four bytes; the length field does not count the padding.
        let padding = (4 - value.len() % 4) % 4;
        self.bytes.extend(std::iter::repeat_n(0, padding));
        self.set_length(self.bytes.len() - HEADER_LEN);
        self
    }

    fn set_length(&mut self, len: usize) {
        self.bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    }

    pub fn requested_transport_udp(self) -> Self {
        self.attribute(ATTR_REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0])
    }

    pub fn lifetime(self, seconds: u32) -> Self {
        self.attribute(ATTR_LIFETIME, &seconds.to_be_bytes())
    }

    pub fn channel_number(self, channel: u16) -> Self {
        let mut value = [0u8; 4];
        value[..2].copy_from_slice(&channel.to_be_bytes());
        self.attribute(ATTR_CHANNEL_NUMBER, &value)
    }

    pub fn xor_peer_address(self, peer: SocketAddr) -> Self {
        let value = xor_address(peer, self.transaction());
        self.attribute(ATTR_XOR_PEER_ADDRESS, &value)
    }

    /// USERNAME, REALM, NONCE, then MESSAGE-INTEGRITY over everything before it: the last
    /// attribute this bench sends (no FINGERPRINT; coturn does not ask for it).
    pub fn authenticate(self, username: &str, realm: &str, nonce: &[u8], key: &[u8]) -> Vec<u8> {
        let mut request = self
            .attribute(ATTR_USERNAME, username.as_bytes())
            .attribute(ATTR_REALM, realm.as_bytes())
            .attribute(ATTR_NONCE, nonce);
        // The HMAC covers the header with its length already counting MESSAGE-INTEGRITY.
        let covered = request.bytes.len();
        request.set_length(covered - HEADER_LEN + INTEGRITY_LEN);
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&request.bytes[..covered]);
        let tag = mac.finalize().into_bytes();
        request.attribute(ATTR_MESSAGE_INTEGRITY, &tag).bytes
    }

    /// The request without credentials (the first Allocate, answered 401).
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }

    fn transaction(&self) -> [u8; 12] {
        let mut transaction = [0u8; 12];
        transaction.copy_from_slice(&self.bytes[8..HEADER_LEN]);
        transaction
    }
}

/// A parsed response: its class, transaction and the attributes this bench reads.
#[derive(Debug, Default)]
pub struct Response {
    pub method: u16,
    pub success: bool,
    pub transaction: [u8; 12],
    pub error_code: Option<u16>,
    pub realm: Option<String>,
    pub nonce: Option<Vec<u8>>,
    pub relayed: Option<SocketAddr>,
    pub mapped: Option<SocketAddr>,
}

/// Parses a STUN response; `None` for anything else (requests, indications, garbage).
pub fn parse_response(bytes: &[u8]) -> Option<Response> {
    if bytes.len() < HEADER_LEN || bytes[0] & 0xC0 != 0 {
        return None;
    }
    let kind = u16::from_be_bytes([bytes[0], bytes[1]]);
    let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) != MAGIC_COOKIE
        || bytes.len() < HEADER_LEN + len
    {
        return None;
    }
    let class = kind & CLASS_MASK;
    if class != CLASS_SUCCESS && class != CLASS_ERROR {
        return None;
    }
    let mut response = Response {
        method: kind & !CLASS_MASK,
        success: class == CLASS_SUCCESS,
        ..Response::default()
    };
    response.transaction.copy_from_slice(&bytes[8..HEADER_LEN]);
    let mut rest = &bytes[HEADER_LEN..HEADER_LEN + len];
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        match kind {
            ATTR_ERROR_CODE if len >= 4 => {
                response.error_code = Some(u16::from(value[2] & 0x07) * 100 + u16::from(value[3]));
            }
            ATTR_REALM => response.realm = Some(String::from_utf8_lossy(value).into_owned()),
            ATTR_NONCE => response.nonce = Some(value.to_vec()),
            ATTR_XOR_RELAYED_ADDRESS => {
                response.relayed = parse_xor_address(value, response.transaction);
            }
            ATTR_XOR_MAPPED_ADDRESS => {
                response.mapped = parse_xor_address(value, response.transaction);
            }
            _ => {}
        }
        let padded = (len + 3) & !3;
        rest = rest.get(4 + padded..).unwrap_or_default();
    }
    Some(response)
}

/// An XOR-*-ADDRESS value: family, port and address XORed with the cookie (and, for IPv6,
/// the transaction id).
fn xor_address(address: SocketAddr, transaction: [u8; 12]) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = address.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = vec![0u8];
    match address.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(cookie).map(|(a, b)| a ^ b));
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mask = cookie.iter().chain(&transaction);
            value.extend(ip.octets().iter().zip(mask).map(|(a, b)| a ^ b));
        }
    }
    value
}

fn parse_xor_address(value: &[u8], transaction: [u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = match value.get(1)? {
        0x01 => {
            let raw: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            let mut octets = [0u8; 4];
            for (i, octet) in octets.iter_mut().enumerate() {
                *octet = raw[i] ^ cookie[i];
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        0x02 => {
            let raw: [u8; 16] = value.get(4..20)?.try_into().ok()?;
            let mask: Vec<u8> = cookie.iter().chain(&transaction).copied().collect();
            let mut octets = [0u8; 16];
            for (i, octet) in octets.iter_mut().enumerate() {
                *octet = raw[i] ^ mask[i];
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The first channel number a client may bind (RFC 8656 §12).
pub const FIRST_CHANNEL: u16 = 0x4000;

/// ChannelData: channel number, payload length, payload (over UDP, no padding needed).
pub fn channel_data(channel: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The payload of a ChannelData message, if `bytes` is one.
pub fn parse_channel_data(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let channel = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    if !(0x4000..=0x7FFF).contains(&channel) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]));
    Some((channel, bytes.get(4..4 + len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_address_round_trips() {
        let transaction = [7u8; 12];
        for address in ["127.0.0.1:50000", "[::1]:3478"] {
            let address: SocketAddr = address.parse().unwrap_or_else(|_| unreachable!());
            let value = xor_address(address, transaction);
            assert_eq!(parse_xor_address(&value, transaction), Some(address));
        }
    }

    #[test]
    fn channel_data_round_trips() {
        let mut out = Vec::new();
        channel_data(FIRST_CHANNEL, b"frame", &mut out);
        assert_eq!(
            parse_channel_data(&out),
            Some((FIRST_CHANNEL, &b"frame"[..]))
        );
    }
}
