//! One module per mail protocol: the device side before login, and the
//! XOAUTH2 login upstream. After that, every protocol shares `relay`.

pub mod smtp;
