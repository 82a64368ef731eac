//! The fixed-choice options of `service create` and `service update`
//! (`--runtime`, `--protocol`, `--network`, `--placement`, `--mode`,
//! `--update-strategy`) as clap value enums: a wrong value is refused before
//! anything is sent, with the flag named and the choices listed, and the
//! shells complete them. Each maps onto its skiff-spec enum here, at the
//! edge, so the spec keeps the one spelling of every value.

use clap::ValueEnum;
use skiff_spec as spec;

/// Declares a value enum and its conversion into the spec's enum.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $name:ident => $spec:ty {
            $( $(#[$vmeta:meta])* $variant:ident => $target:ident ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl From<$name> for $spec {
            fn from(choice: $name) -> Self {
                match choice {
                    $( $name::$variant => <$spec>::$target ),+
                }
            }
        }

        impl $name {
            /// The value as the spec (and the API) spells it.
            pub fn as_str(self) -> &'static str {
                <$spec>::from(self).as_str()
            }
        }
    };
}

choice! {
    /// `--runtime`.
    Runtime => spec::RuntimeKind {
        /// A container from --image.
        Oci => Oci,
        /// A host process running the command.
        Process => Process,
    }
}

choice! {
    /// `--protocol`: what the published port carries.
    Protocol => spec::Protocol {
        /// Any TCP stream.
        Tcp => Tcp,
        /// HTTP/1.1: the routing proxy also counts requests.
        Http => Http,
    }
}

choice! {
    /// `--network`.
    Network => spec::NetworkMode {
        /// Own network namespace; the host port maps to the container port.
        Bridge => Bridge,
        /// The node's network namespace.
        Host => Host,
    }
}

choice! {
    /// `--placement`.
    Placement => spec::PlacementPolicy {
        /// Across nodes, then zones.
        Spread => Spread,
        /// Fill nodes up.
        Binpack => Binpack,
    }
}

choice! {
    /// `--mode`.
    Mode => spec::ServiceMode {
        /// --replicas replicas wherever the scheduler puts them.
        Replicated => Replicated,
        /// One replica on every eligible node.
        Global => Global,
    }
}

choice! {
    /// `--update-strategy`.
    Strategy => spec::Strategy {
        /// A few replicas at a time, new ones first.
        Rolling => Rolling,
        /// The whole new version beside the old, then one switch.
        #[value(alias = "bluegreen")]
        BlueGreen => BlueGreen,
        /// A few new replicas take a share of the traffic first.
        Canary => Canary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clap's spelling of each choice must be the spec's, or a value shown
    /// by `service inspect` would not be accepted back by a flag.
    #[test]
    fn every_choice_is_spelled_as_the_spec_spells_it() {
        fn check<T: ValueEnum + Copy>(as_str: fn(T) -> &'static str) {
            for value in T::value_variants() {
                let name = value.to_possible_value().expect("no skipped variant");
                assert_eq!(name.get_name(), as_str(*value));
            }
        }
        check(Runtime::as_str);
        check(Protocol::as_str);
        check(Network::as_str);
        check(Placement::as_str);
        check(Mode::as_str);
        check(Strategy::as_str);
    }
}
