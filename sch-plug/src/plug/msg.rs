//! Every rtnetlink message the plug backend sends, built as values so they can be checked
//! byte by byte (see the tests) before they ever reach a kernel.
//!
//! The Remus layout on a guest interface `DEV`:
//! `DEV ingress qdisc --u32 match-all, protocol ETH_P_ALL--> mirred egress redirect --> IFB
//! --root plug qdisc--> (released) back into DEV's receive path`.
//!
//! The plug qdisc is not modelled by netlink-packet-route: its `TCA_OPTIONS` is a flat
//! `struct tc_plug_qopt { int action; __u32 limit; }` (include/uapi/linux/pkt_sched.h), while
//! the crate's `TcAttribute::Options` always emits a nested attribute, which sch_plug rejects.
//! So the options attribute is hand-written here as a raw `DefaultNla`.

use netlink_packet_core::{
    DefaultNla, NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoKind, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

/// `TCA_OPTIONS` (linux/rtnetlink.h).
pub const TCA_OPTIONS: u16 = 2;
/// `ETH_P_ALL` (linux/if_ether.h): the filter matches IPv4, IPv6, ARP and everything else.
pub const ETH_P_ALL: u16 = 0x0003;
/// The filter preference the agent owns on the guest interface's ingress hook; teardown and
/// adoption find the filter by it. Chosen outside iproute2's automatic range (49152 down).
pub const FILTER_PREF: u16 = 0x5250;
/// The handle of the plug qdisc (`5250:`), so changes address exactly it.
pub const PLUG_HANDLE: TcHandle = TcHandle {
    major: 0x5250,
    minor: 0,
};
/// The ingress qdisc's handle (`ffff:`).
pub const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// The parent of ingress filters; valid under both an `ingress` and a `clsact` qdisc.
pub const INGRESS_FILTER_PARENT: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_INGRESS,
};

/// The actions of `struct tc_plug_qopt` (include/uapi/linux/pkt_sched.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlugAction {
    /// `TCQ_PLUG_BUFFER`: close the current epoch; packets from now on belong to the next.
    Buffer = 0,
    /// `TCQ_PLUG_RELEASE_ONE`: release the packets of the last closed epoch.
    ReleaseOne = 1,
    /// `TCQ_PLUG_RELEASE_INDEFINITE`: release everything and stop holding.
    ReleaseIndefinite = 2,
    /// `TCQ_PLUG_LIMIT`: set the byte limit.
    Limit = 3,
}

/// The 8-byte `struct tc_plug_qopt { int action; __u32 limit; }` in native endianness.
pub fn plug_qopt(action: PlugAction, limit: u32) -> [u8; 8] {
    let mut raw = [0u8; 8];
    raw[..4].copy_from_slice(&(action as i32).to_ne_bytes());
    raw[4..].copy_from_slice(&limit.to_ne_bytes());
    raw
}

fn request(msg: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = NetlinkMessage::from(msg);
    m.header.flags = NLM_F_REQUEST | flags;
    m
}

fn tc_header(msg: &mut TcMessage, index: i32, handle: TcHandle, parent: TcHandle, info: u32) {
    msg.header.index = index;
    msg.header.handle = handle;
    msg.header.parent = parent;
    msg.header.info = info;
}

/// `tc qdisc add dev IFB root handle 5250: plug limit LIMIT`.
pub fn new_plug_qdisc(ifb_index: u32, limit: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc_header(&mut tc, ifb_index as i32, PLUG_HANDLE, TcHandle::ROOT, 0);
    tc.attributes.push(TcAttribute::Kind("plug".into()));
    tc.attributes.push(TcAttribute::Other(DefaultNla::new(
        TCA_OPTIONS,
        plug_qopt(PlugAction::Limit, limit).to_vec(),
    )));
    request(
        RouteNetlinkMessage::NewQueueDiscipline(tc),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `tc qdisc change dev IFB root handle 5250: plug block|release|release_indefinite|limit N`.
/// `limit` is read by the kernel only for [`PlugAction::Limit`].
pub fn change_plug(
    ifb_index: u32,
    action: PlugAction,
    limit: u32,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc_header(&mut tc, ifb_index as i32, PLUG_HANDLE, TcHandle::ROOT, 0);
    tc.attributes.push(TcAttribute::Kind("plug".into()));
    tc.attributes.push(TcAttribute::Other(DefaultNla::new(
        TCA_OPTIONS,
        plug_qopt(action, limit).to_vec(),
    )));
    request(RouteNetlinkMessage::NewQueueDiscipline(tc), NLM_F_ACK)
}

/// `tc qdisc add dev DEV ingress`.
pub fn new_ingress_qdisc(dev_index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc_header(
        &mut tc,
        dev_index as i32,
        INGRESS_HANDLE,
        TcHandle::INGRESS,
        0,
    );
    tc.attributes.push(TcAttribute::Kind("ingress".into()));
    request(
        RouteNetlinkMessage::NewQueueDiscipline(tc),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `tc qdisc del dev DEV ingress`.
pub fn del_ingress_qdisc(dev_index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc_header(
        &mut tc,
        dev_index as i32,
        INGRESS_HANDLE,
        TcHandle::INGRESS,
        0,
    );
    request(RouteNetlinkMessage::DelQueueDiscipline(tc), NLM_F_ACK)
}

/// `tc qdisc show dev DEV` (a dump filtered on the interface by the kernel or by us).
pub fn dump_qdiscs(index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc.header.index = index as i32;
    request(RouteNetlinkMessage::GetQueueDiscipline(tc), NLM_F_DUMP)
}

/// `tc filter add dev DEV parent ffff:fff2 protocol all pref 0x5250 u32 match u32 0 0
/// action mirred egress redirect dev IFB`.
pub fn new_redirect_filter(dev_index: u32, ifb_index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()]; // mask 0, value 0: matches every packet

    let mut mirred = TcMirror::default();
    mirred.generic = TcActionGeneric::default();
    mirred.generic.action = TcActionType::Stolen;
    mirred.eaction = TcMirrorActionType::EgressRedir;
    mirred.ifindex = ifb_index;

    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirred,
        ))]),
    ];

    let mut tc = TcMessage::default();
    tc_header(
        &mut tc,
        dev_index as i32,
        TcHandle::UNSPEC,
        INGRESS_FILTER_PARENT,
        filter_info(FILTER_PREF),
    );
    tc.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.into()));
    tc.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    request(
        RouteNetlinkMessage::NewTrafficFilter(tc),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `tcm_info` of a filter: preference in the high half, the protocol in network order in
/// the low half (`TC_H_MAKE(prio << 16, htons(proto))`).
pub fn filter_info(pref: u16) -> u32 {
    (u32::from(pref) << 16) | u32::from(ETH_P_ALL.to_be())
}

/// `tc filter del dev DEV parent ffff:fff2 pref 0x5250` (every node of that preference).
pub fn del_redirect_filter(dev_index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc_header(
        &mut tc,
        dev_index as i32,
        TcHandle::UNSPEC,
        INGRESS_FILTER_PARENT,
        filter_info(FILTER_PREF),
    );
    request(RouteNetlinkMessage::DelTrafficFilter(tc), NLM_F_ACK)
}

/// `tc filter show dev DEV ingress`.
pub fn dump_ingress_filters(dev_index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut tc = TcMessage::default();
    tc_header(
        &mut tc,
        dev_index as i32,
        TcHandle::UNSPEC,
        INGRESS_FILTER_PARENT,
        0,
    );
    request(RouteNetlinkMessage::GetTrafficFilter(tc), NLM_F_DUMP)
}

/// `ip link add NAME type ifb`.
pub fn new_ifb(name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.into()));
    link.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
    request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `ip link set dev INDEX alias ALIAS addrgenmode none up`. The alias marks the IFB as the
/// agent's (and records what setup found, for teardown); `addrgenmode none` keeps IPv6 from
/// giving the IFB a link-local address, whose router solicitations and MLD reports would
/// otherwise be queued in the plug alongside the guest's packets.
pub fn configure_ifb(index: u32, alias: &str, ipv6: bool) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    link.attributes.push(LinkAttribute::IfAlias(alias.into()));
    if ipv6 {
        link.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
    }
    request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
}

/// `ip link set dev INDEX up`.
pub fn set_link_up(index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
}

/// `ip link set dev INDEX master BRIDGE_INDEX`.
pub fn set_link_master(index: u32, master: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(LinkAttribute::Controller(master));
    request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
}

/// `ip link del dev INDEX`.
pub fn del_link(index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    request(RouteNetlinkMessage::DelLink(link), NLM_F_ACK)
}

/// `ip link show dev NAME`.
pub fn get_link(name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.into()));
    request(RouteNetlinkMessage::GetLink(link), NLM_F_ACK)
}

/// The deterministic IFB name for a guest interface (at most 15 bytes, IFNAMSIZ - 1):
/// `ifb-NAME` when that fits, else `ifb_` + 8 hex digits of a hash of the name. The two forms
/// differ in their fourth byte, so a short name never collides with a hashed one; hashed
/// collisions are caught by the alias check at setup.
pub fn ifb_name(dev: &str) -> String {
    if dev.len() <= 11 {
        format!("ifb-{dev}")
    } else {
        // FNV-1a, 32 bits: stable across releases and platforms (unlike std's hasher).
        let mut h: u32 = 0x811c_9dc5;
        for b in dev.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("ifb_{h:08x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(mut m: NetlinkMessage<RouteNetlinkMessage>) -> Vec<u8> {
        m.header.sequence_number = 7;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    /// An attribute: `nla_len`, `nla_type`, payload, padded to 4 bytes.
    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn nlmsg(ty: u16, flags: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&7u32.to_ne_bytes()); // sequence
        v.extend_from_slice(&0u32.to_ne_bytes()); // port id
        v.extend_from_slice(body);
        v
    }

    /// `struct tcmsg`: family, 3 bytes pad, ifindex, handle, parent, info.
    fn tcmsg(ifindex: i32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
        let mut v = vec![0u8; 4];
        v.extend_from_slice(&ifindex.to_ne_bytes());
        v.extend_from_slice(&handle.to_ne_bytes());
        v.extend_from_slice(&parent.to_ne_bytes());
        v.extend_from_slice(&info.to_ne_bytes());
        v
    }

    /// `struct ifinfomsg`: family, pad, type, index, flags, change.
    fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
        let mut v = vec![0u8; 4];
        v.extend_from_slice(&index.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&change.to_ne_bytes());
        v
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const RTM_GETLINK: u16 = 18;
    const RTM_SETLINK: u16 = 19;
    const RTM_NEWQDISC: u16 = 36;
    const RTM_DELQDISC: u16 = 37;
    const RTM_GETQDISC: u16 = 38;
    const RTM_NEWTFILTER: u16 = 44;
    const RTM_DELTFILTER: u16 = 45;
    const RTM_GETTFILTER: u16 = 46;
    const REQ_ACK: u16 = 0x1 | 0x4;
    const CREATE_EXCL: u16 = 0x400 | 0x200;
    const DUMP: u16 = 0x1 | 0x300;

    #[test]
    fn plug_qopt_layout() {
        let raw = plug_qopt(PlugAction::Limit, 0x0102_0304);
        assert_eq!(&raw[..4], &3i32.to_ne_bytes());
        assert_eq!(&raw[4..], &0x0102_0304u32.to_ne_bytes());
        for (action, code) in [
            (PlugAction::Buffer, 0i32),
            (PlugAction::ReleaseOne, 1),
            (PlugAction::ReleaseIndefinite, 2),
            (PlugAction::Limit, 3),
        ] {
            assert_eq!(&plug_qopt(action, 0)[..4], &code.to_ne_bytes());
        }
    }

    #[test]
    fn new_plug_qdisc_bytes() {
        let body = cat(&[
            &tcmsg(9, 0x5250_0000, 0xffff_ffff, 0),
            &nla(1, b"plug\0"),
            &nla(2, &plug_qopt(PlugAction::Limit, 65536)),
        ]);
        assert_eq!(
            bytes(new_plug_qdisc(9, 65536)),
            nlmsg(RTM_NEWQDISC, REQ_ACK | CREATE_EXCL, &body)
        );
        // The options attribute is flat (no NLA_F_NESTED bit, 8-byte payload).
        let b = bytes(new_plug_qdisc(9, 65536));
        assert_eq!(&b[b.len() - 12..b.len() - 8], &[12, 0, 2, 0]);
    }

    #[test]
    fn change_plug_bytes_table() {
        for (action, limit) in [
            (PlugAction::Buffer, 0),
            (PlugAction::ReleaseOne, 0),
            (PlugAction::ReleaseIndefinite, 0),
            (PlugAction::Limit, 100_000),
        ] {
            let body = cat(&[
                &tcmsg(4, 0x5250_0000, 0xffff_ffff, 0),
                &nla(1, b"plug\0"),
                &nla(2, &plug_qopt(action, limit)),
            ]);
            assert_eq!(
                bytes(change_plug(4, action, limit)),
                nlmsg(RTM_NEWQDISC, REQ_ACK, &body),
                "{action:?}"
            );
        }
    }

    #[test]
    fn ingress_qdisc_bytes() {
        let body = cat(&[
            &tcmsg(3, 0xffff_0000, 0xffff_fff1, 0),
            &nla(1, b"ingress\0"),
        ]);
        assert_eq!(
            bytes(new_ingress_qdisc(3)),
            nlmsg(RTM_NEWQDISC, REQ_ACK | CREATE_EXCL, &body)
        );
        assert_eq!(
            bytes(del_ingress_qdisc(3)),
            nlmsg(
                RTM_DELQDISC,
                REQ_ACK,
                &tcmsg(3, 0xffff_0000, 0xffff_fff1, 0)
            )
        );
        assert_eq!(
            bytes(dump_qdiscs(3)),
            nlmsg(RTM_GETQDISC, DUMP, &tcmsg(3, 0, 0, 0))
        );
    }

    #[test]
    fn redirect_filter_bytes() {
        // struct tc_u32_sel: flags=TERMINAL(1), offshift, nkeys=1, pad, offmask, off, offoff,
        // hoff, hmask; then one struct tc_u32_key {mask, val, off, offmask}, all zero.
        let mut sel = vec![1u8, 0, 1, 0];
        sel.extend_from_slice(&[0u8; 12]);
        sel.extend_from_slice(&[0u8; 16]);
        // struct tc_mirred: tc_gen {index, capab, action=TC_ACT_STOLEN(4), refcnt, bindcnt},
        // eaction=TCA_EGRESS_REDIR(1), ifindex.
        let mut mirred = Vec::new();
        for v in [0i32, 0, 4, 0, 0, 1] {
            mirred.extend_from_slice(&v.to_ne_bytes());
        }
        mirred.extend_from_slice(&12u32.to_ne_bytes());
        let act_opts = nla(2 /* TCA_MIRRED_PARMS */, &mirred);
        let action = cat(&[
            &nla(1 /* TCA_ACT_KIND */, b"mirred\0"),
            &nla(2 | 0x8000 /* TCA_ACT_OPTIONS, nested */, &act_opts),
        ]);
        let actions = nla(1 /* tab 1 */, &action);
        let u32_opts = cat(&[
            &nla(5 /* TCA_U32_SEL */, &sel),
            &nla(7 /* TCA_U32_ACT */, &actions),
        ]);
        let info = (0x5250u32 << 16) | u32::from(0x0003u16.to_be());
        let body = cat(&[
            &tcmsg(3, 0, 0xffff_fff2, info),
            &nla(1, b"u32\0"),
            &nla(2, &u32_opts),
        ]);
        assert_eq!(
            bytes(new_redirect_filter(3, 12)),
            nlmsg(RTM_NEWTFILTER, REQ_ACK | CREATE_EXCL, &body)
        );
        assert_eq!(
            bytes(del_redirect_filter(3)),
            nlmsg(RTM_DELTFILTER, REQ_ACK, &tcmsg(3, 0, 0xffff_fff2, info))
        );
        assert_eq!(
            bytes(dump_ingress_filters(3)),
            nlmsg(RTM_GETTFILTER, DUMP, &tcmsg(3, 0, 0xffff_fff2, 0))
        );
        // On a little-endian host the protocol half reads 00 03 on the wire (network order).
        if cfg!(target_endian = "little") {
            assert_eq!(info.to_ne_bytes(), [0x00, 0x03, 0x50, 0x52]);
        }
    }

    #[test]
    fn link_messages_bytes() {
        // IFLA_INFO_KIND NUL-terminated (the kernel compares with nla_strcmp, which accepts
        // the string with or without its NUL).
        let linkinfo = nla(
            18, /* IFLA_LINKINFO */
            &nla(1 /* IFLA_INFO_KIND */, b"ifb\0"),
        );
        let body = cat(&[
            &ifinfomsg(0, 0, 0),
            &nla(3 /* IFLA_IFNAME */, b"ifb-tap0\0"),
            &linkinfo,
        ]);
        assert_eq!(
            bytes(new_ifb("ifb-tap0")),
            nlmsg(RTM_NEWLINK, REQ_ACK | CREATE_EXCL, &body)
        );

        let af = nla(
            26, /* IFLA_AF_SPEC */
            &nla(
                10, /* AF_INET6 */
                &nla(8 /* IFLA_INET6_ADDR_GEN_MODE */, &[1]),
            ),
        );
        let body = cat(&[
            &ifinfomsg(12, 1, 1),
            &nla(20 /* IFLA_IFALIAS */, b"remus\0"),
            &af,
        ]);
        assert_eq!(
            bytes(configure_ifb(12, "remus", true)),
            nlmsg(RTM_SETLINK, REQ_ACK, &body)
        );
        let body = cat(&[&ifinfomsg(12, 1, 1), &nla(20, b"remus\0")]);
        assert_eq!(
            bytes(configure_ifb(12, "remus", false)),
            nlmsg(RTM_SETLINK, REQ_ACK, &body)
        );
        assert_eq!(
            bytes(set_link_up(5)),
            nlmsg(RTM_SETLINK, REQ_ACK, &ifinfomsg(5, 1, 1))
        );
        assert_eq!(
            bytes(set_link_master(5, 2)),
            nlmsg(
                RTM_SETLINK,
                REQ_ACK,
                &cat(&[
                    &ifinfomsg(5, 0, 0),
                    &nla(10 /* IFLA_MASTER */, &2u32.to_ne_bytes())
                ])
            )
        );
        assert_eq!(
            bytes(del_link(5)),
            nlmsg(RTM_DELLINK, REQ_ACK, &ifinfomsg(5, 0, 0))
        );
        assert_eq!(
            bytes(get_link("tap0")),
            nlmsg(
                RTM_GETLINK,
                REQ_ACK,
                &cat(&[&ifinfomsg(0, 0, 0), &nla(3, b"tap0\0")])
            )
        );
    }

    #[test]
    fn ifb_names_fit_and_differ() {
        let cases = [("tap0", "ifb-tap0"), ("abcdefghijk", "ifb-abcdefghijk")];
        for (dev, want) in cases {
            assert_eq!(ifb_name(dev), want);
        }
        let long = ifb_name("abcdefghijkl");
        assert!(long.starts_with("ifb_") && long.len() == 12, "{long}");
        assert_eq!(long, ifb_name("abcdefghijkl"), "deterministic");
        assert_ne!(long, ifb_name("abcdefghijkm"));
        for dev in ["a", "vnet0", "a-fifteen-chars", "remus-dom1-net0"] {
            assert!(ifb_name(dev).len() <= 15, "{dev}");
        }
    }
}
