# The plug backend against the real sch_plug (sch-plug/src/bin/sch-plug-kernel-tests.rs).
harness_modules sch_plug ifb act_mirred cls_u32 cls_matchall sch_ingress veth
harness_cargo_bin sch-plug sch-plug-kernel-tests testkit
