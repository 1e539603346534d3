//! Which addresses are on the public internet, with an IPv4 address carried
//! in IPv6 judged as that IPv4 address, and which are cloud metadata endpoints.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The IPv4 address an IPv6 address carries, if it carries one: mapped
/// (`::ffff:0:0/96`), compatible (`::/96`, but not `::` or `::1`), or NAT64
/// (`64:ff9b::/96`, and `64:ff9b:1::/48` laid out as RFC 6052 says). Every
/// check classifies this form, so `::ffff:169.254.169.254` is the metadata
/// address it leads to.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let segments = ip.segments();
    if let Some(mapped) = ip.to_ipv4_mapped() {
        return Some(mapped);
    }
    if segments[..6] == [0; 6] && u32::from(last) > 1 {
        return Some(last);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last);
    }
    if segments[..3] == [0x64, 0xff9b, 1] {
        return Some(Ipv4Addr::new(o[6], o[7], o[9], o[10]));
    }
    None
}

/// `ip` with an IPv4 address carried in IPv6 written as that IPv4 address.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is not on the public internet, or `None` when it is.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match normalize(ip) {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match () {
        _ if is_metadata(IpAddr::V4(ip)) => "a cloud metadata address",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() => "multicast",
        _ if a == 100 && (64..128).contains(&b) => "shared (carrier-grade NAT)",
        _ if a >= 240 => "reserved",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    Some(match () {
        _ if is_metadata(IpAddr::V6(ip)) => "a cloud metadata address",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_unique_local() => "private (unique local)",
        _ if ip.is_unicast_link_local() => "link-local",
        _ if ip.is_multicast() => "multicast",
        _ => return None,
    })
}

/// Cloud instance metadata endpoints: they hand out credentials, so only a rule
/// naming the very address reaches them.
pub fn is_metadata(ip: IpAddr) -> bool {
    const METADATA: [IpAddr; 3] = [
        IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
        IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    ];
    METADATA.contains(&normalize(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classes() {
        for (ip, public) in [
            ("8.8.8.8", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("192.168.1.1", false),
            ("169.254.1.1", false),
            ("100.64.0.1", false),
            ("0.0.0.0", false),
            ("::1", false),
            ("fd12::1", false),
            ("fe80::1", false),
            ("::ffff:127.0.0.1", false),
            ("2606:4700::1111", true),
        ] {
            assert_eq!(non_public_reason(ip.parse().unwrap()).is_none(), public, "{ip}");
        }
    }

    #[test]
    fn ipv4_carried_in_ipv6_is_classified_as_that_ipv4() {
        for (form, carried) in [
            ("::ffff:169.254.169.254", "169.254.169.254"),
            ("::169.254.169.254", "169.254.169.254"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("64:ff9b:1:a9fe:a9:fe00::", "169.254.169.254"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("64:ff9b::a00:5", "10.0.0.5"),
            ("64:ff9b:1:c0a8:1:100::", "192.168.1.1"),
        ] {
            let ip: IpAddr = form.parse().unwrap();
            assert_eq!(normalize(ip), carried.parse::<IpAddr>().unwrap(), "{form}");
            assert!(non_public_reason(ip).is_some(), "{form} is not public");
        }
        for form in ["::ffff:169.254.169.254", "::169.254.169.254", "64:ff9b::a9fe:a9fe", "64:ff9b:1:a9fe:a9:fe00::"] {
            assert!(is_metadata(form.parse().unwrap()), "{form} is the metadata address");
        }
        assert_eq!(non_public_reason("64:ff9b::808:808".parse().unwrap()), None, "NAT64 of 8.8.8.8 is public");
        assert_eq!(normalize("::1".parse().unwrap()), "::1".parse::<IpAddr>().unwrap(), "IPv6 loopback stays IPv6");
        assert_eq!(normalize("2606:4700::1111".parse().unwrap()), "2606:4700::1111".parse::<IpAddr>().unwrap());
    }
}
