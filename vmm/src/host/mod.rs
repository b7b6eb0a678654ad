//! The host side of the machine: the terminal and files the console talks
//! to, signals, and skiff's own log.

pub mod bridge_helper;
pub mod chardevs;
pub mod console;
pub mod console_writer;
pub mod limits;
pub mod logger;
pub mod privileges;
pub mod sandbox;
pub mod signals;
pub mod socket_end;
pub mod vde;
pub mod vfio;
