use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use JSON::PP;

my $d = scratch();

# A qcow2 of 1 GiB in 512-byte clusters: its L1 table takes 256 KiB.
qimg_ok('create', '-f', 'qcow2', '-o', 'cluster_size=512', "$d/l1.qcow2", '1G');

my $e = do { eval { Instar::info("$d/l1.qcow2", memory_limit => 128 * 1024) }; $@ };
ok(ref($e) && $e->code == Instar::E_LIMIT, 'info with a memory_limit below the L1 table dies with E_LIMIT');
like("$e", qr/Operation stopped: its memory limit of 131072 bytes is reached \(allocating the L1 table, 262144 bytes\)/,
    '... naming what it was allocating');
is_deeply(Instar::info("$d/l1.qcow2", memory_limit => 64 << 20), qimg_json('info', '--output=json', "$d/l1.qcow2"),
    'within its memory_limit: qemu-img info');
is_deeply(Instar::info("$d/l1.qcow2", memory_limit => 64 << 20, timeout => 600, cpu_limit => 600),
    qimg_json('info', '--output=json', "$d/l1.qcow2"), '... with the time limits beside it');
$e = do { eval { Instar::info("$d/l1.qcow2", memory_limit => -1) }; $@ };
like("$e", qr/memory_limit/, 'a negative memory_limit is refused');

done_testing();
