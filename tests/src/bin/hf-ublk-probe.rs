//! hf-ublk-probe: checks the broker's typed ublk interface
//! (`holdfast_kernel::ublk::sys`) against a real ublk kernel;
//! run inside the kernel VM by `tests/kernel-vm/run ublk`.
//!
//!   hf-ublk-probe features   print the kernel's UBLK_F_* bits; fail unless
//!                            the broker's needed ones are there
//!   hf-ublk-probe add-del    add a device with those flags, set its
//!                            parameters, read its info back, delete it
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast_kernel::ublk::sys::{self, Control, DevInfo, ParamBasic, Params};

fn features(ctl: &mut Control) {
    let features = ctl.features().expect("GET_FEATURES");
    let f = features.0;
    println!("features {f:#x}");
    for (bit, name) in sys::FLAG_NAMES.iter().enumerate() {
        println!(
            "  {name:<24} {}",
            if f >> bit & 1 == 1 { "yes" } else { "no" }
        );
    }
    features.check().expect("the broker's needed features");
}

fn add_del(ctl: &mut Control) {
    let want = DevInfo {
        nr_hw_queues: 1,
        queue_depth: 64,
        max_io_buf_bytes: 1 << 20,
        dev_id: u32::MAX,
        flags: sys::Features::NEEDED,
        ..DevInfo::default()
    };
    let info = ctl.add(&want).expect("ADD_DEV");
    let id = info.dev_id;
    println!("added ublk device {id}: flags {:#x}", info.flags);
    assert_ne!(id, u32::MAX);
    assert_eq!(info.flags & want.flags, want.flags, "flags not kept");
    let cdev = format!("/dev/ublkc{id}");
    let end = Instant::now() + Duration::from_secs(5);
    while !Path::new(&cdev).exists() {
        assert!(Instant::now() < end, "{cdev} did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    let size: u64 = 64 << 20;
    let params = Params {
        len: size_of::<Params>() as u32,
        types: sys::PARAM_TYPE_BASIC,
        basic: ParamBasic {
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: (1 << 20) >> 9,
            dev_sectors: size >> 9,
            ..ParamBasic::default()
        },
        ..Params::default()
    };
    ctl.set_params(id, &params).expect("SET_PARAMS");
    let back = ctl.info(id).expect("GET_DEV_INFO");
    println!(
        "info: state {} queues {} depth {} max io {}",
        back.state, back.nr_hw_queues, back.queue_depth, back.max_io_buf_bytes
    );
    assert_eq!(
        back.state,
        sys::STATE_DEAD,
        "a device never started is DEAD"
    );
    assert_eq!((back.nr_hw_queues, back.queue_depth), (1, 64));
    ctl.delete(id).expect("DEL_DEV");
    let err = ctl.info(id).expect_err("GET_DEV_INFO after DEL_DEV");
    println!("after delete: {err}");
    assert!(!Path::new(&cdev).exists(), "{cdev} still there");
    println!("add-del: ok");
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    let mut ctl = Control::open().expect("open /dev/ublk-control (is ublk_drv loaded?)");
    match what.as_str() {
        "features" => features(&mut ctl),
        "add-del" => add_del(&mut ctl),
        _ => {
            eprintln!("usage: hf-ublk-probe features|add-del");
            std::process::exit(2);
        }
    }
}
