use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use Instar::PVE;

# 100,000 info calls (INSTAR_PERL_MEMORY_CALLS to change the count) leave RSS flat: results, error objects and
# option strings are all released.
my $calls = $ENV{INSTAR_PERL_MEMORY_CALLS} // 100_000;
my $d = scratch();
qimg_ok('create', '-f', 'qcow2', "$d/m.qcow2", '16M');
qimg_ok('snapshot', '-c', 's', "$d/m.qcow2");
qimg_ok('create', '-f', 'raw', "$d/m.raw", '1M');

my $round = sub {
    my ($n) = @_;
    for my $i (1 .. $n) {
        my $k = $i % 4;
        if ($k == 0) { my $r = Instar::info("$d/m.raw", format => 'raw'); die if !$r->{'virtual-size'}; }
        elsif ($k == 1) { my $j = Instar::PVE::qemu_img_info("$d/m.qcow2", 'qcow2', 5); die if !$j; }
        elsif ($k == 2) { my $r = Instar::PVE::qemu_img_info_struct("$d/m.raw", 'raw'); die if !$r; }
        else { eval { Instar::info("$d/none") }; die if !ref $@; }
    }
};
$round->(2000);
my $before = rss_kib();
$round->($calls);
my $after = rss_kib();
cmp_ok($after - $before, '<', 4096, "$calls info calls: RSS $before -> $after KiB (less than 4 MiB growth)");

done_testing;
