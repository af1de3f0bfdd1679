//! Installing, adopting, inspecting and removing the Remus layout on a guest interface.
//!
//! Invariants:
//! - Setup is idempotent: every piece is looked up before it is created, so a second setup
//!   (an agent restart) adopts what the first one built — one IFB, one filter, one plug.
//! - The IFB carries an alias `remus-netbuf dev=DEV ingress=created|existing`: it proves the
//!   IFB is ours (a hashed name may collide) and records whether the guest interface had an
//!   ingress hook before us, so teardown restores exactly the earlier state even after a
//!   restart lost the agent's memory.
//! - The plug qdisc is created before the redirect filter: traffic is never redirected into
//!   an IFB that cannot hold it. A failure part-way removes what this call created.
//! - A kernel lacking a needed module is named in [`PlugError::MissingKernelFeature`].

use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_route::tc::{
    TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
    TcOption, TcStats2,
};
use netlink_packet_route::RouteNetlinkMessage;

use super::msg::{self, PlugAction, FILTER_PREF, PLUG_HANDLE};
use super::rtnl::{Rtnl, RtnlError};
use super::PlugError;

const ENOENT: i32 = libc::ENOENT;
const ENODEV: i32 = libc::ENODEV;
const EOPNOTSUPP: i32 = libc::EOPNOTSUPP;
const EAFNOSUPPORT: i32 = libc::EAFNOSUPPORT;
const ALIAS_PREFIX: &str = "remus-netbuf dev=";

/// Whether the guest interface had an ingress hook (ingress or clsact qdisc) before setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressOrigin {
    /// Setup created the ingress qdisc; teardown deletes it.
    Created,
    /// It was there before; teardown leaves it.
    Existing,
}

/// The installed layout of one guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugDevice {
    /// The guest interface (the tap).
    pub dev: String,
    /// Its ifindex.
    pub dev_index: u32,
    /// The IFB holding its traffic.
    pub ifb: String,
    /// The IFB's ifindex.
    pub ifb_index: u32,
    /// Who owns the ingress qdisc.
    pub ingress: IngressOrigin,
    /// Whether this setup adopted an existing IFB (agent restart) rather than creating it.
    pub adopted: bool,
}

/// The kernel's counters of the plug qdisc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QdiscCounters {
    /// Packets dequeued (released) since the qdisc was created (32-bit in the kernel ABI).
    pub sent_packets: u32,
    /// Bytes dequeued.
    pub sent_bytes: u64,
    /// Packets queued now.
    pub backlog_packets: u32,
    /// Bytes queued now.
    pub backlog_bytes: u32,
    /// Packets dropped at the limit.
    pub drops: u32,
}

impl QdiscCounters {
    /// Packets ever accepted (sent + queued).
    pub fn accepted_packets(&self) -> u64 {
        u64::from(self.sent_packets) + u64::from(self.backlog_packets)
    }

    /// Bytes ever accepted.
    pub fn accepted_bytes(&self) -> u64 {
        self.sent_bytes + u64::from(self.backlog_bytes)
    }
}

/// What `status` sees on a guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugStatus {
    /// The guest interface.
    pub dev: String,
    /// Whether it exists.
    pub dev_present: bool,
    /// The IFB (name, index) when it exists and is ours.
    pub ifb: Option<(String, u32)>,
    /// Whether the guest interface has an ingress hook.
    pub ingress: bool,
    /// Whether our redirect filter is installed and points at the IFB.
    pub filter: bool,
    /// The plug qdisc's counters when it is installed.
    pub plug: Option<QdiscCounters>,
}

impl PlugStatus {
    /// Whether the whole layout is in place.
    pub fn complete(&self) -> bool {
        self.dev_present && self.ifb.is_some() && self.ingress && self.filter && self.plug.is_some()
    }
}

/// What teardown removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeardownReport {
    pub filter_removed: bool,
    pub ingress_removed: bool,
    pub ifb_removed: bool,
}

#[derive(Debug, Clone)]
struct LinkSeen {
    index: u32,
    kind: Option<InfoKind>,
    alias: Option<String>,
}

#[derive(Debug, Clone)]
struct QdiscSeen {
    kind: String,
    handle: u32,
    parent: u32,
    counters: QdiscCounters,
}

#[derive(Debug, Clone)]
struct FilterSeen {
    pref: u16,
    mirred_to: Option<u32>,
}

fn alias_for(dev: &str, origin: IngressOrigin) -> String {
    let o = match origin {
        IngressOrigin::Created => "created",
        IngressOrigin::Existing => "existing",
    };
    format!("{ALIAS_PREFIX}{dev} ingress={o}")
}

/// The ingress origin recorded in an IFB alias written for `dev`, or `None` if the alias is
/// not ours for that device.
pub fn parse_alias(alias: Option<&str>, dev: &str) -> Option<IngressOrigin> {
    let rest = alias?.strip_prefix(ALIAS_PREFIX)?;
    let (d, origin) = rest.rsplit_once(" ingress=")?;
    if d != dev {
        return None;
    }
    match origin {
        "created" => Some(IngressOrigin::Created),
        "existing" => Some(IngressOrigin::Existing),
        _ => None,
    }
}

fn net(dev: &str) -> impl Fn(RtnlError) -> PlugError + '_ {
    move |source| PlugError::Netlink {
        dev: dev.to_string(),
        source,
    }
}

fn missing(dev: &str, module: &'static str, config: &'static str) -> PlugError {
    PlugError::MissingKernelFeature {
        dev: dev.to_string(),
        module,
        config,
    }
}

async fn link(rtnl: &Rtnl, name: &str) -> Result<Option<LinkSeen>, RtnlError> {
    let answers = match rtnl
        .request(format!("get link {name}"), msg::get_link(name))
        .await
    {
        Ok(a) => a,
        Err(e) if e.errno() == Some(ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    for a in answers {
        if let RouteNetlinkMessage::NewLink(l) = a {
            let mut seen = LinkSeen {
                index: l.header.index,
                kind: None,
                alias: None,
            };
            for attr in l.attributes {
                match attr {
                    LinkAttribute::IfAlias(s) => seen.alias = Some(s),
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let LinkInfo::Kind(k) = i {
                                seen.kind = Some(k);
                            }
                        }
                    }
                    _ => {}
                }
            }
            return Ok(Some(seen));
        }
    }
    Ok(None)
}

async fn qdiscs(rtnl: &Rtnl, index: u32, name: &str) -> Result<Vec<QdiscSeen>, RtnlError> {
    let answers = rtnl
        .request(format!("list qdiscs of {name}"), msg::dump_qdiscs(index))
        .await?;
    let mut out = Vec::new();
    for a in answers {
        let RouteNetlinkMessage::NewQueueDiscipline(tc) = a else {
            continue;
        };
        if tc.header.index != index as i32 {
            continue;
        }
        let mut q = QdiscSeen {
            kind: String::new(),
            handle: tc.header.handle.into(),
            parent: tc.header.parent.into(),
            counters: QdiscCounters::default(),
        };
        for attr in tc.attributes {
            match attr {
                TcAttribute::Kind(k) => q.kind = k,
                TcAttribute::Stats2(stats) => {
                    for s in stats {
                        match s {
                            TcStats2::Basic(b) => {
                                q.counters.sent_packets = b.packets;
                                q.counters.sent_bytes = b.bytes;
                            }
                            TcStats2::Queue(qs) => {
                                q.counters.backlog_packets = qs.qlen;
                                q.counters.backlog_bytes = qs.backlog;
                                q.counters.drops = qs.drops;
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(q);
    }
    Ok(out)
}

async fn ingress_filters(
    rtnl: &Rtnl,
    index: u32,
    name: &str,
) -> Result<Vec<FilterSeen>, RtnlError> {
    let answers = match rtnl
        .request(
            format!("list ingress filters of {name}"),
            msg::dump_ingress_filters(index),
        )
        .await
    {
        Ok(a) => a,
        // No ingress hook at all: no filters.
        Err(e) if matches!(e.errno(), Some(ENOENT) | Some(libc::EINVAL)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for a in answers {
        let RouteNetlinkMessage::NewTrafficFilter(tc) = a else {
            continue;
        };
        let mut f = FilterSeen {
            pref: (tc.header.info >> 16) as u16,
            mirred_to: None,
        };
        for attr in tc.attributes {
            let TcAttribute::Options(opts) = attr else {
                continue;
            };
            for o in opts {
                let TcOption::U32(TcFilterU32Option::Action(actions)) = o else {
                    continue;
                };
                for action in actions {
                    for aa in action.attributes {
                        let TcActionAttribute::Options(aopts) = aa else {
                            continue;
                        };
                        for ao in aopts {
                            if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = ao {
                                f.mirred_to = Some(p.ifindex);
                            }
                        }
                    }
                }
            }
        }
        out.push(f);
    }
    Ok(out)
}

/// The preferences of every ingress filter node on `dev` (u32 filters show one node per
/// hash table and key): lets tests prove adoption added no duplicate.
pub async fn ingress_filter_prefs(rtnl: &Rtnl, dev: &str) -> Result<Vec<u16>, PlugError> {
    let Some(d) = link(rtnl, dev).await.map_err(net(dev))? else {
        return Ok(Vec::new());
    };
    let filters = ingress_filters(rtnl, d.index, dev)
        .await
        .map_err(net(dev))?;
    Ok(filters.iter().map(|f| f.pref).collect())
}

/// How many of `dev`'s ingress filter nodes redirect somewhere (one per installed filter).
pub async fn redirect_filter_count(rtnl: &Rtnl, dev: &str) -> Result<usize, PlugError> {
    let Some(d) = link(rtnl, dev).await.map_err(net(dev))? else {
        return Ok(0);
    };
    let filters = ingress_filters(rtnl, d.index, dev)
        .await
        .map_err(net(dev))?;
    Ok(filters.iter().filter(|f| f.mirred_to.is_some()).count())
}

fn is_ingress_hook(q: &QdiscSeen) -> bool {
    (q.kind == "ingress" || q.kind == "clsact") && q.parent == 0xffff_fff1
}

fn is_our_plug(q: &QdiscSeen) -> bool {
    q.kind == "plug" && q.handle == u32::from(PLUG_HANDLE)
}

/// Reads the plug qdisc's counters on `ifb_index`.
pub async fn plug_counters(
    rtnl: &Rtnl,
    dev: &str,
    ifb: &str,
    ifb_index: u32,
) -> Result<QdiscCounters, PlugError> {
    let qs = qdiscs(rtnl, ifb_index, ifb).await.map_err(net(dev))?;
    qs.iter()
        .find(|q| is_our_plug(q))
        .map(|q| q.counters)
        .ok_or_else(|| PlugError::LayoutGone {
            dev: dev.to_string(),
            what: format!("plug qdisc on {ifb}"),
        })
}

/// Sends one plug action.
pub async fn plug_action(
    rtnl: &Rtnl,
    device: &PlugDevice,
    action: PlugAction,
    limit: u32,
) -> Result<(), PlugError> {
    rtnl.request(
        format!("plug {action:?} on {}", device.ifb),
        msg::change_plug(device.ifb_index, action, limit),
    )
    .await
    .map_err(net(&device.dev))?;
    Ok(())
}

/// Installs (or adopts) the layout on `dev` with the plug limited to `limit` bytes.
pub async fn setup(rtnl: &Rtnl, dev: &str, limit: u32) -> Result<PlugDevice, PlugError> {
    let dev_link =
        link(rtnl, dev)
            .await
            .map_err(net(dev))?
            .ok_or_else(|| PlugError::DeviceNotFound {
                dev: dev.to_string(),
                netns: rtnl.netns().to_string(),
            })?;
    let ifb = msg::ifb_name(dev);
    let existing_ifb = link(rtnl, &ifb).await.map_err(net(dev))?;
    let recorded_origin = match &existing_ifb {
        None => None,
        Some(l) => {
            let origin = parse_alias(l.alias.as_deref(), dev);
            if origin.is_none() || l.kind != Some(InfoKind::Ifb) {
                return Err(PlugError::IfbNameTaken {
                    dev: dev.to_string(),
                    ifb,
                    alias: l.alias.clone(),
                });
            }
            origin
        }
    };
    let dev_qdiscs = qdiscs(rtnl, dev_link.index, dev).await.map_err(net(dev))?;
    let has_ingress = dev_qdiscs.iter().any(is_ingress_hook);
    let origin = if has_ingress {
        recorded_origin.unwrap_or(IngressOrigin::Existing)
    } else {
        IngressOrigin::Created
    };

    let (ifb_index, created_ifb) =
        match existing_ifb {
            Some(l) => (l.index, false),
            None => {
                match rtnl
                    .request(format!("create {ifb}"), msg::new_ifb(&ifb))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.errno() == Some(EOPNOTSUPP) => {
                        return Err(missing(dev, "ifb", "CONFIG_IFB"))
                    }
                    Err(e) => return Err(net(dev)(e)),
                }
                let l = link(rtnl, &ifb).await.map_err(net(dev))?.ok_or_else(|| {
                    PlugError::LayoutGone {
                        dev: dev.to_string(),
                        what: format!("{ifb} right after creating it"),
                    }
                })?;
                (l.index, true)
            }
        };
    let mut device = PlugDevice {
        dev: dev.to_string(),
        dev_index: dev_link.index,
        ifb: ifb.clone(),
        ifb_index,
        ingress: origin,
        adopted: !created_ifb,
    };
    let mut created_ingress = false;
    let result = install(rtnl, &mut device, limit, has_ingress, &mut created_ingress).await;
    if let Err(e) = result {
        // Undo what this call created, newest first; the original error is what matters.
        if created_ingress {
            let _ = rtnl
                .request(
                    "roll back ingress",
                    msg::del_ingress_qdisc(device.dev_index),
                )
                .await;
        }
        if created_ifb {
            let _ = rtnl
                .request("roll back ifb", msg::del_link(ifb_index))
                .await;
        }
        return Err(e);
    }
    Ok(device)
}

async fn install(
    rtnl: &Rtnl,
    device: &mut PlugDevice,
    limit: u32,
    has_ingress: bool,
    created_ingress: &mut bool,
) -> Result<(), PlugError> {
    let dev = device.dev.clone();
    let alias = alias_for(&dev, device.ingress);
    let configured = rtnl
        .request(
            format!("configure {}", device.ifb),
            msg::configure_ifb(device.ifb_index, &alias, true),
        )
        .await;
    match configured {
        Ok(_) => {}
        // A kernel without IPv6 refuses the inet6 part; then there is nothing to silence.
        Err(e) if matches!(e.errno(), Some(EAFNOSUPPORT) | Some(EOPNOTSUPP)) => {
            rtnl.request(
                format!("configure {}", device.ifb),
                msg::configure_ifb(device.ifb_index, &alias, false),
            )
            .await
            .map_err(net(&dev))?;
        }
        Err(e) => return Err(net(&dev)(e)),
    }

    // The plug first: nothing is redirected before something can hold it.
    let ifb_qdiscs = qdiscs(rtnl, device.ifb_index, &device.ifb)
        .await
        .map_err(net(&dev))?;
    if ifb_qdiscs.iter().any(is_our_plug) {
        plug_action(rtnl, device, PlugAction::Limit, limit).await?;
    } else {
        match rtnl
            .request(
                format!("add plug qdisc on {}", device.ifb),
                msg::new_plug_qdisc(device.ifb_index, limit),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.errno(), Some(ENOENT) | Some(EOPNOTSUPP)) => {
                return Err(missing(&dev, "sch_plug", "CONFIG_NET_SCH_PLUG"))
            }
            Err(e) => return Err(net(&dev)(e)),
        }
    }

    if !has_ingress {
        match rtnl
            .request(
                format!("add ingress qdisc on {dev}"),
                msg::new_ingress_qdisc(device.dev_index),
            )
            .await
        {
            Ok(_) => *created_ingress = true,
            Err(e) if matches!(e.errno(), Some(ENOENT) | Some(EOPNOTSUPP)) => {
                return Err(missing(&dev, "sch_ingress", "CONFIG_NET_SCH_INGRESS"))
            }
            Err(e) => return Err(net(&dev)(e)),
        }
    }

    let filters = ingress_filters(rtnl, device.dev_index, &dev)
        .await
        .map_err(net(&dev))?;
    let ours: Vec<&FilterSeen> = filters.iter().filter(|f| f.pref == FILTER_PREF).collect();
    if ours.iter().any(|f| f.mirred_to == Some(device.ifb_index)) {
        return Ok(());
    }
    if !ours.is_empty() {
        // A stale filter of ours (its IFB was recreated): replace it.
        rtnl.request(
            format!("remove stale filter on {dev}"),
            msg::del_redirect_filter(device.dev_index),
        )
        .await
        .map_err(net(&dev))?;
    }
    match rtnl
        .request(
            format!("add redirect filter {dev} -> {}", device.ifb),
            msg::new_redirect_filter(device.dev_index, device.ifb_index),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.errno(), Some(ENOENT) | Some(EOPNOTSUPP)) => {
            let text = e.extack().unwrap_or_default().to_ascii_lowercase();
            if text.contains("action") {
                Err(missing(&dev, "act_mirred", "CONFIG_NET_ACT_MIRRED"))
            } else {
                Err(missing(&dev, "cls_u32", "CONFIG_NET_CLS_U32"))
            }
        }
        Err(e) => Err(net(&dev)(e)),
    }
}

/// What is installed on `dev` now.
pub async fn status(rtnl: &Rtnl, dev: &str) -> Result<PlugStatus, PlugError> {
    let ifb = msg::ifb_name(dev);
    let dev_link = link(rtnl, dev).await.map_err(net(dev))?;
    let ifb_link = link(rtnl, &ifb)
        .await
        .map_err(net(dev))?
        .filter(|l| parse_alias(l.alias.as_deref(), dev).is_some());
    let mut st = PlugStatus {
        dev: dev.to_string(),
        dev_present: dev_link.is_some(),
        ifb: ifb_link.as_ref().map(|l| (ifb.clone(), l.index)),
        ingress: false,
        filter: false,
        plug: None,
    };
    if let Some(d) = &dev_link {
        st.ingress = qdiscs(rtnl, d.index, dev)
            .await
            .map_err(net(dev))?
            .iter()
            .any(is_ingress_hook);
        if st.ingress {
            let filters = ingress_filters(rtnl, d.index, dev)
                .await
                .map_err(net(dev))?;
            st.filter = filters.iter().any(|f| {
                f.pref == FILTER_PREF
                    && ifb_link
                        .as_ref()
                        .is_some_and(|l| f.mirred_to == Some(l.index))
            });
        }
    }
    if let Some(l) = &ifb_link {
        st.plug = qdiscs(rtnl, l.index, &ifb)
            .await
            .map_err(net(dev))?
            .into_iter()
            .find(is_our_plug)
            .map(|q| q.counters);
    }
    Ok(st)
}

/// Removes the layout from `dev`, restoring its ingress hook to what setup found. Held
/// packets are dropped with the IFB. Removing an absent layout succeeds.
pub async fn teardown(rtnl: &Rtnl, dev: &str) -> Result<TeardownReport, PlugError> {
    let mut report = TeardownReport::default();
    let ifb = msg::ifb_name(dev);
    let ifb_link = link(rtnl, &ifb).await.map_err(net(dev))?;
    let origin = match &ifb_link {
        Some(l) => match parse_alias(l.alias.as_deref(), dev) {
            Some(o) => Some(o),
            None => {
                return Err(PlugError::IfbNameTaken {
                    dev: dev.to_string(),
                    ifb,
                    alias: l.alias.clone(),
                })
            }
        },
        None => None,
    };
    if let Some(d) = link(rtnl, dev).await.map_err(net(dev))? {
        let filters = ingress_filters(rtnl, d.index, dev)
            .await
            .map_err(net(dev))?;
        if filters.iter().any(|f| f.pref == FILTER_PREF) {
            rtnl.request(
                format!("remove filter on {dev}"),
                msg::del_redirect_filter(d.index),
            )
            .await
            .map_err(net(dev))?;
            report.filter_removed = true;
        }
        let others_remain = filters.iter().any(|f| f.pref != FILTER_PREF);
        if origin == Some(IngressOrigin::Created) && !others_remain {
            let has_ingress = qdiscs(rtnl, d.index, dev)
                .await
                .map_err(net(dev))?
                .iter()
                .any(|q| q.kind == "ingress" && q.parent == 0xffff_fff1);
            if has_ingress {
                rtnl.request(
                    format!("remove ingress qdisc on {dev}"),
                    msg::del_ingress_qdisc(d.index),
                )
                .await
                .map_err(net(dev))?;
                report.ingress_removed = true;
            }
        }
    }
    if let Some(l) = ifb_link {
        match rtnl
            .request(format!("delete {ifb}"), msg::del_link(l.index))
            .await
        {
            Ok(_) => report.ifb_removed = true,
            Err(e) if e.errno() == Some(ENODEV) => {}
            Err(e) => return Err(net(dev)(e)),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_round_trip_table() {
        let rows = [
            (
                Some(alias_for("tap0", IngressOrigin::Created)),
                "tap0",
                Some(IngressOrigin::Created),
            ),
            (
                Some(alias_for("tap0", IngressOrigin::Existing)),
                "tap0",
                Some(IngressOrigin::Existing),
            ),
            (
                Some(alias_for("tap0", IngressOrigin::Created)),
                "tap1",
                None,
            ),
            (Some("something else".to_string()), "tap0", None),
            (
                Some("remus-netbuf dev=tap0 ingress=maybe".to_string()),
                "tap0",
                None,
            ),
            (None, "tap0", None),
        ];
        for (alias, dev, want) in rows {
            assert_eq!(parse_alias(alias.as_deref(), dev), want, "{alias:?} {dev}");
        }
    }

    #[test]
    fn accepted_counts_sent_and_queued() {
        let c = QdiscCounters {
            sent_packets: 3,
            sent_bytes: 300,
            backlog_packets: 2,
            backlog_bytes: 200,
            drops: 1,
        };
        assert_eq!(c.accepted_packets(), 5);
        assert_eq!(c.accepted_bytes(), 500);
    }
}
