//! Structured choices read from fuzz bytes, for the targets that build
//! their input (tar archives, raft messages) rather than parse it raw.
//! Reading past the end gives zeros, so every input is a valid recipe.

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = (v << 8) | u64::from(self.byte());
        }
        v
    }

    /// A small number: usually below 8, sometimes anything.
    pub fn small(&mut self) -> u64 {
        match self.byte() {
            b @ 0..=200 => u64::from(b % 8),
            201..=250 => u64::from(self.byte()),
            _ => self.u64(),
        }
    }

    /// Up to `max` raw bytes.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.byte() as usize).min(max).min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken
    }

    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.byte() as usize % choices.len()]
    }
}
