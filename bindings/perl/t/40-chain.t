use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use File::Copy qw(copy);

my $d = scratch();

# Two identical chains base <- mid <- top, one for qemu-img and one for instar.
for my $p (qw(q i)) {
    qimg_ok('create', '-f', 'qcow2', "$d/$p-base.qcow2", '8M');
    qemu_io('-c', 'write -P 1 0 2M', "$d/$p-base.qcow2");
    qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$p-base.qcow2", "$d/$p-mid.qcow2");
    qemu_io('-c', 'write -P 2 1M 2M', "$d/$p-mid.qcow2");
    qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$p-mid.qcow2", "$d/$p-top.qcow2");
    qemu_io('-c', 'write -P 3 2M 2M', "$d/$p-top.qcow2");
}
copy("$d/q-top.qcow2", "$d/ref-top.qcow2") or die;
copy("$d/q-mid.qcow2", "$d/ref-mid.qcow2") or die;
qimg_ok('rebase', '-u', '-F', 'qcow2', '-b', "$d/q-base.qcow2", "$d/ref-mid.qcow2");
qimg_ok('rebase', '-u', '-F', 'qcow2', '-b', "$d/ref-mid.qcow2", "$d/ref-top.qcow2");

# rebase (safe) top onto base: contents stay, the header names base
qimg_ok('rebase', '-F', 'qcow2', '-b', 'q-base.qcow2', "$d/q-top.qcow2");
Instar::rebase("$d/i-top.qcow2", backing_file => 'i-base.qcow2', backing_format => 'qcow2');
is(Instar::info("$d/i-top.qcow2")->{'backing-filename'}, 'i-base.qcow2', 'rebase: new backing file');
ok(same_image("$d/i-top.qcow2", "$d/ref-top.qcow2"), 'rebase: the guest contents are unchanged');
is_deeply(Instar::map("$d/i-top.qcow2", force_share => 1), do {
    my $m = Instar::map("$d/q-top.qcow2"); for (@$m) { $_->{filename} =~ s{/q-}{/i-} if $_->{filename} } $m }, 'rebase: the same allocation as qemu-img');
(undef, undef, my $qerr) = qimg('rebase', '-b', "$d/q-base.qcow2", "$d/q-top.qcow2");
$qerr =~ s{/q-}{/i-}g;
eval { Instar::rebase("$d/i-top.qcow2", backing_file => "$d/i-base.qcow2") };
is("qemu-img: $@\n", $qerr, 'rebase without -F: qemu-img\'s message');
Instar::rebase("$d/i-mid.qcow2", backing_file => 'nothing', unsafe => 1, backing_format => 'qcow2');
is(Instar::info("$d/i-mid.qcow2")->{'backing-filename'}, 'nothing', 'rebase -u only rewrites the header');
Instar::rebase("$d/i-mid.qcow2", backing_file => 'i-base.qcow2', unsafe => 1, backing_format => 'qcow2');

# commit top into base
qimg_ok('commit', "$d/q-top.qcow2");
Instar::commit("$d/i-top.qcow2");
ok(same_image("$d/i-base.qcow2", "$d/q-base.qcow2"), 'commit: base holds what qemu-img commit puts there');
ok(same_image("$d/i-base.qcow2", "$d/ref-top.qcow2"), 'commit: base reads as the old top');
is((qimg('check', "$d/i-base.qcow2"))[0], 0, 'commit: base checks clean');
(undef, undef, $qerr) = qimg('commit', "$d/q-base.qcow2");
eval { Instar::commit("$d/i-base.qcow2") };
is("qemu-img: $@\n", $qerr, 'commit without a backing file: qemu-img\'s message');
is($@->code, Instar::E_CHAIN, '... E_CHAIN');

# internal snapshots
qimg_ok('create', '-f', 'qcow2', "$d/s.qcow2", '4M');
qemu_io('-c', 'write -P 9 0 64k', "$d/s.qcow2");
Instar::snapshot_create("$d/s.qcow2", 'first');
qemu_io('-c', 'write -P 8 0 64k', "$d/s.qcow2");
Instar::snapshot_create("$d/s.qcow2", 'second');
my $list = Instar::snapshot_list("$d/s.qcow2");
is_deeply($list, qimg_json('info', '--output=json', "$d/s.qcow2")->{snapshots}, 'snapshot_list = qemu-img info snapshots');
is_deeply([map { $_->{name} } @$list], [qw(first second)], 'both snapshots, in order');
Instar::snapshot_apply("$d/s.qcow2", 'first');
qemu_io('-c', 'read -P 9 0 64k', "$d/s.qcow2");
pass('snapshot_apply: the image reads as at "first"');
Instar::snapshot_delete("$d/s.qcow2", 'second');
is_deeply([map { $_->{name} } @{ Instar::snapshot_list("$d/s.qcow2") }], ['first'], 'snapshot_delete');
is((qimg('check', "$d/s.qcow2"))[0], 0, 'snapshots: the image checks clean');
(undef, undef, $qerr) = qimg('snapshot', '-d', 'nope', "$d/s.qcow2");
eval { Instar::snapshot_delete("$d/s.qcow2", 'nope') };
is("qemu-img: $@\n", $qerr, 'deleting a missing snapshot: qemu-img\'s message');
(undef, undef, $qerr) = qimg('snapshot', '-a', 'nope', "$d/s.qcow2");
eval { Instar::snapshot_apply("$d/s.qcow2", 'nope') };
is("qemu-img: $@\n", $qerr, 'applying a missing snapshot: qemu-img\'s message');

# bitmaps
qimg_ok('create', '-f', 'qcow2', "$d/bq.qcow2", '4M');
qimg_ok('create', '-f', 'qcow2', "$d/bi.qcow2", '4M');
qimg_ok('bitmap', '--add', '-g', '128k', "$d/bq.qcow2", 'b1');
qimg_ok('bitmap', '--add', "$d/bq.qcow2", 'b2');
qimg_ok('bitmap', '--disable', "$d/bq.qcow2", 'b2');
qimg_ok('bitmap', '--merge', 'b1', "$d/bq.qcow2", 'b2');
Instar::bitmap("$d/bi.qcow2", 'b1', ['add'], granularity => 128 << 10);
Instar::bitmap("$d/bi.qcow2", 'b2', ['add', 'disable', [merge => 'b1']]);
is_deeply(Instar::info("$d/bi.qcow2")->{'format-specific'}, qimg_json('info', '--output=json', "$d/bq.qcow2")->{'format-specific'},
    'bitmap add/disable/merge: the bitmaps qemu-img makes');
(undef, undef, $qerr) = qimg('bitmap', '--remove', "$d/bq.qcow2", 'zz');
eval { Instar::bitmap("$d/bi.qcow2", 'zz', ['remove']) };
is("qemu-img: $@\n", $qerr, 'removing a missing bitmap: qemu-img\'s message');
eval { Instar::bitmap("$d/bi.qcow2", 'zz', ['frobnicate']) };
like("$@", qr/unknown action/, 'an unknown action is refused');

# dd
qimg_ok('create', '-f', 'qcow2', "$d/ddsrc.qcow2", '3M');
qemu_io('-c', 'write -P 0x42 0 1M', "$d/ddsrc.qcow2");
qimg_ok('dd', '-f', 'qcow2', '-O', 'raw', 'bs=64k', 'count=20', 'skip=2', "if=$d/ddsrc.qcow2", "of=$d/ddq.raw");
Instar::dd("$d/ddsrc.qcow2", "$d/ddi.raw", input_format => 'qcow2', output_format => 'raw', block_size => 65536,
    count => 20, skip => 2);
ok(same_image("$d/ddq.raw", "$d/ddi.raw"), 'dd bs= count= skip=: the image qemu-img dd makes');
is(-s "$d/ddi.raw", -s "$d/ddq.raw", '... of the same size');

# bench (a short read run)
my $b = Instar::bench("$d/ddsrc.qcow2", count => 100, depth => 4);
is($b->{requests}, 100, 'bench: 100 requests');
is($b->{bytes}, 100 * 4096, 'bench: bytes');
ok($b->{seconds} >= 0, 'bench: seconds');

done_testing;
