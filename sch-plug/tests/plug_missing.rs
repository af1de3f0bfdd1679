//! On a kernel without sch_plug (this machine's and CI's), setting up the plug backend must
//! fail with the typed error naming the module, leave nothing behind, and make `Auto` pick
//! the relay. Real netlink, a real tap in a real namespace. On a kernel that has sch_plug
//! this test says so and checks the opposite (setup works), so it never passes vacuously.

use sch_plug::backend::{probe_plug, resolve, Backend};
use sch_plug::ctl::{self, CtlTarget};
use sch_plug::plug::{msg, PlugBuffer, PlugError};
use sch_plug::relay::tap;
use sch_plug::testkit::{link_exists, TempNetns};
use sch_plug::{BackendKind, EgressBuffer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plug_setup_reports_missing_sch_plug() {
    let ns = TempNetns::new().unwrap();
    let name = format!("tpm{}", std::process::id() % 100_000);
    let _tap = tap::create(&name, &ns.netns()).unwrap();
    let rtnl = ns.rtnl().unwrap();
    let has_plug = probe_plug(&ns.netns()).await.is_ok();
    match PlugBuffer::setup(&name, &ns.netns(), 1 << 20).await {
        Err(e) => {
            println!("plug setup on a kernel without sch_plug: {e}");
            assert!(!has_plug, "probe and setup disagree: {e}");
            assert!(
                matches!(
                    e,
                    PlugError::MissingKernelFeature {
                        module: "sch_plug",
                        ..
                    }
                ),
                "{e}"
            );
            assert_eq!(
                e.to_string(),
                format!("plug setup on {name}: the kernel lacks sch_plug (CONFIG_NET_SCH_PLUG)")
            );
            assert!(
                !link_exists(&rtnl, &msg::ifb_name(&name)).await,
                "the IFB was rolled back"
            );
            let st = ctl::status(&CtlTarget {
                dev: name.clone(),
                backend: Backend::Plug,
                netns: ns.netns(),
            })
            .await
            .unwrap();
            assert!(
                !st.ingress && !st.filter && st.ifb.is_none(),
                "nothing left: {st}"
            );
            let e = ctl::setup(
                &CtlTarget {
                    dev: name.clone(),
                    backend: Backend::Plug,
                    netns: ns.netns(),
                },
                1 << 20,
            )
            .await
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("netbuf setup on {name}: the kernel lacks sch_plug (CONFIG_NET_SCH_PLUG): use --backend relay")
            );
            let e = ctl::setup(
                &CtlTarget {
                    dev: name.clone(),
                    backend: Backend::Auto,
                    netns: ns.netns(),
                },
                1 << 20,
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains("lacks sch_plug"), "{e}");
            assert_eq!(
                resolve(Backend::Auto, &ns.netns()).await.unwrap(),
                BackendKind::Relay
            );
        }
        Ok(mut b) => {
            println!("this kernel has sch_plug: checking that setup works instead");
            assert!(has_plug);
            assert_eq!(
                resolve(Backend::Auto, &ns.netns()).await.unwrap(),
                BackendKind::Plug
            );
            b.teardown().await.unwrap();
        }
    }
}
