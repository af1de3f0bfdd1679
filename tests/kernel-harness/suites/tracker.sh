# The soft-dirty tracker against a kernel with CONFIG_MEM_SOFT_DIRTY
# (tracker/src/bin/tracker-softdirty-check.rs): the check and its pwrite() negative control.
harness_cargo_bin remus-tracker tracker-softdirty-check
