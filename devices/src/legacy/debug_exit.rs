//! QEMU's `isa-debug-exit`: a guest write of V ends the VMM with status
//! `(V << 1) | 1`, so a test guest can report a result through the exit code
//! (and can never fake a clean 0).

use std::sync::Arc;

use super::le_value;
use crate::{BusDevice, VmControl, VmEvent};

pub struct DebugExit {
    control: Arc<dyn VmControl>,
}

impl DebugExit {
    pub fn new(control: Arc<dyn VmControl>) -> Self {
        DebugExit { control }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let value = le_value(data) as i32;
        self.control.request(VmEvent::Exit((value << 1) | 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_utils::RecordingControl;

    #[test]
    fn exit_status_is_value_shifted_with_low_bit() {
        let control = Arc::new(RecordingControl::default());
        let mut dev = DebugExit::new(control.clone());
        dev.write(0, &[5]);
        dev.write(0, &[0]);
        dev.write(0, &[0x34, 0x12]);
        assert_eq!(
            *control.0.lock().unwrap(),
            vec![VmEvent::Exit(11), VmEvent::Exit(1), VmEvent::Exit(0x2469)]
        );
    }
}
