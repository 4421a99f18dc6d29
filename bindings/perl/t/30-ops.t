use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use File::Copy qw(copy);

my $d = scratch();

sub slurp { open(my $fh, '<:raw', $_[0]) or die "$_[0]: $!"; local $/; return scalar <$fh>; }

# create: the same bytes qemu-img writes
for my $case (
    [raw => 'raw', 10 << 20, undef],
    [q2 => 'qcow2', 1 << 30, undef],
    [q2ext => 'qcow2', 64 << 20, 'extended_l2=on,cluster_size=128k,preallocation=metadata'],
    [q2v2 => 'qcow2', 100 << 20, 'compat=0.10'],
) {
    my ($name, $fmt, $size, $o) = @$case;
    qimg_ok('create', '-f', $fmt, ($o ? ('-o', $o) : ()), "$d/q-$name", $size);
    Instar::create("$d/i-$name", format => $fmt, size => $size, ($o ? (options => $o) : ()));
    ok(slurp("$d/q-$name") eq slurp("$d/i-$name"), "create $name: the bytes qemu-img writes");
}
qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/q-q2", "$d/q-back");
Instar::create("$d/i-back", format => 'qcow2', backing_file => "$d/q-q2", backing_format => 'qcow2');
ok(slurp("$d/q-back") eq slurp("$d/i-back"), 'create with a backing file');
my (undef, undef, $qerr) = qimg('create', '-f', 'qcow2', '-o', 'cluster_size=3k', "$d/bad", '1M');
eval { Instar::create("$d/bad", format => 'qcow2', size => 1 << 20, options => 'cluster_size=3k') };
is("qemu-img: $@\n", $qerr, 'create error: qemu-img\'s message');

# a source with data, zeroes and a snapshot
qimg_ok('create', '-f', 'qcow2', "$d/src.qcow2", '32M');
qemu_io('-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x6b 8M 512k', "$d/src.qcow2");
qimg_ok('snapshot', '-c', 's1', "$d/src.qcow2");
qemu_io('-c', 'write -P 0x7c 0 64k', "$d/src.qcow2");

# convert
Instar::convert("$d/src.qcow2", "$d/c.raw");
ok(same_image("$d/src.qcow2", "$d/c.raw"), 'convert to raw: qemu-img compare identical');
Instar::convert("$d/src.qcow2", "$d/c.qcow2", target_format => 'qcow2', options => 'cluster_size=128k',
    compress => 0);
ok(same_image("$d/src.qcow2", "$d/c.qcow2"), 'convert to qcow2 with options');
qimg_ok('convert', '-O', 'qcow2', '-o', 'cluster_size=128k', "$d/src.qcow2", "$d/qc.qcow2");
ok(slurp("$d/qc.qcow2") eq slurp("$d/c.qcow2"), '... the same file qemu-img convert writes');
Instar::convert("$d/src.qcow2", "$d/snap.raw", snapshot => 'snapshot.name=s1', source_format => 'qcow2');
qimg_ok('convert', '-l', 'snapshot.name=s1', '-f', 'qcow2', "$d/src.qcow2", "$d/qsnap.raw");
ok(same_image("$d/qsnap.raw", "$d/snap.raw"), 'convert -l snapshot.name=');
qimg_ok('create', '-f', 'qcow2', "$d/pre.qcow2", '32M');
Instar::convert("$d/src.qcow2", "$d/pre.qcow2", no_create => 1, target_format => 'qcow2', rate_limit => 1 << 40);
ok(same_image("$d/src.qcow2", "$d/pre.qcow2"), 'convert -n into an existing image, with a rate limit');
is((qimg('check', "$d/pre.qcow2"))[0], 0, '... and it checks clean');
(undef, undef, $qerr) = qimg('convert', '-O', 'qcow2', '-o', 'nosuch=1', "$d/src.qcow2", "$d/x.qcow2");
eval { Instar::convert("$d/src.qcow2", "$d/x.qcow2", target_format => 'qcow2', options => 'nosuch=1') };
is(join('', map { "qemu-img: $_\n" } split /\n/, "$@"), $qerr, 'convert error: qemu-img\'s message');
ok(!-e "$d/x.qcow2", '... and no target left behind');

# measure
for my $args ([[], {}], [['-o', 'cluster_size=128k,extended_l2=on'], { options => 'cluster_size=128k,extended_l2=on' }]) {
    my ($qa, $ia) = @$args;
    is_deeply(Instar::measure(undef, size => 10 << 30, output_format => 'qcow2', %$ia),
        qimg_json('measure', '--output=json', '--size', 10 << 30, '-O', 'qcow2', @$qa), "measure --size @$qa");
    is_deeply(Instar::measure("$d/src.qcow2", output_format => 'qcow2', %$ia),
        qimg_json('measure', '--output=json', '-O', 'qcow2', @$qa, "$d/src.qcow2"), "measure FILE @$qa");
}
my $mres = Instar::measure(undef, size => 1 << 60, output_format => 'qcow2', options => 'cluster_size=2M');
ok(is_int_sv($mres->{'fully-allocated'}), 'measure: byte counts are integers');

# check
my $qc = qimg_json('check', '--output=json', "$d/src.qcow2");
my $ic = Instar::check("$d/src.qcow2");
is(delete $ic->{exit_code}, 0, 'check: exit code 0');
delete @{$qc}{qw(filename format)};
is_deeply($ic, $qc, 'check counters = qemu-img check --output=json');
my ($rc, $qtext) = qimg('check', '--output=json', "$d/src.qcow2");
is(Instar::check_json("$d/src.qcow2"), $qtext, 'check_json is qemu-img\'s text');
# a leak, found then repaired
copy("$d/src.qcow2", "$d/leak.qcow2") or die;
qemu_io('-c', 'write -P 1 16M 64k', "$d/leak.qcow2");
{
    my $r = Instar::check("$d/leak.qcow2");
    is($r->{exit_code}, (qimg('check', "$d/leak.qcow2"))[0], 'check exit code = qemu-img check\'s');
}
# check_report on a real leak: a fresh image's first data cluster (at 0x50000) made unreferenced by zeroing its
# L2 entry (qemu's layout: L2 table at 0x40000)
qimg_ok('create', '-f', 'qcow2', "$d/lk.qcow2", '1M');
qemu_io('-c', 'write -P 1 0 64k', "$d/lk.qcow2");
{
    open(my $fh, '+<:raw', "$d/lk.qcow2") or die;
    sysseek($fh, 0x40000, 0) or die;
    syswrite($fh, "\0" x 8) == 8 or die;
    close $fh;
    my ($qrc, $qjson, $qmsg) = qimg('check', '--output=json', "$d/lk.qcow2");
    my $rep = Instar::check_report("$d/lk.qcow2");
    is($rep->{result}{exit_code}, $qrc, 'check_report: qemu-img check\'s exit code (3, a leak)');
    is($rep->{result}{leaks}, 1, '... one leak counted');
    is($rep->{json}, $qjson, '... qemu-img check --output=json\'s text');
    is($rep->{messages}, $qmsg, '... and the lines qemu-img prints on stderr');
}

# probe: a qcow2 header as bytes in memory, as a stream inspector holds it
{
    my $hdr = substr(slurp("$d/src.qcow2"), 0, 512);
    my $p = Instar::probe([[0, $hdr]], format => 'qcow2');
    ok($p->{match}, 'probe: the header bytes are qcow2');
    is($p->{virtual_size}, qimg_json('info', '--output=json', "$d/src.qcow2")->{'virtual-size'},
        '... with qemu-img\'s virtual size');
    is($p->{version}, 3, '... version 3');
    is($p->{violations}, 0, '... and nothing unsafe');
    my $b = Instar::probe([[0, substr(slurp("$d/q-back"), 0, 512)]], format => 'qcow2');
    ok($b->{violations} & 1, 'probe: a backing file is reported (INSTAR_PROBE_V_BACKING_FILE)');
    like($b->{message}, qr/backing/i, '... in words');
    my $r = Instar::probe([[0, "\0" x 512]], format => 'qcow2');
    ok(defined($r->{match}) && !$r->{match}, 'probe: zeroes are not qcow2');
    eval { Instar::probe([[0, $hdr]], format => 'nope') };
    is($@->code, Instar::E_INVALID, 'probe of an unknown format: E_INVALID');
}
# inspect: a plain qcow2 is safe, one with a backing file is not (oslo.utils refuses it), unless nothing is fatal
{
    my $r = Instar::inspect("$d/src.qcow2");
    ok(!$r->{fatal}, 'inspect: a plain qcow2 passes the default policy');
    is($r->{format}, 'qcow2', '... detected as qcow2');
    is($r->{virtual_size}, qimg_json('info', '--output=json', "$d/src.qcow2")->{'virtual-size'},
        '... with qemu-img\'s virtual size');
    is($r->{preset}, 'glance', '... under the glance preset');
    my $b = Instar::inspect("$d/q-back");
    ok($b->{fatal}, 'inspect: a qcow2 with a backing file is refused');
    ok((grep { $_->{code} eq 'backing-file' && $_->{fatal} } @{ $b->{violations} }), '... for its backing file');
    ok(!Instar::inspect("$d/q-back", fatal => [])->{fatal}, '... and not with fatal => []');
    is(Instar::inspect("$d/src.qcow2", declared_format => 'raw')->{fatal}, 1 == 1,
        'inspect: a qcow2 declared raw is refused');
    eval { Instar::inspect("$d/src.qcow2", preset => 'nope') };
    like($@, qr/unknown inspect preset/, 'inspect: an unknown preset croaks');
}

my ($cj, $cx) = Instar::check_chain_json("$d/src.qcow2");
like($cj, qr/^\[/, 'check_chain_json gives a JSON array');
is($cx, 0, '... and exit code 0');
(undef, undef, $qerr) = qimg('check', '-f', 'raw', "$d/c.raw");
eval { Instar::check("$d/c.raw", format => 'raw') };
is("qemu-img: $@\n", $qerr, 'check of raw: qemu-img\'s message');
is($@->code, Instar::E_UNSUPPORTED, '... E_UNSUPPORTED');

# resize
copy("$d/src.qcow2", "$_") or die for "$d/rq.qcow2", "$d/ri.qcow2";
qimg_ok('resize', "$d/rq.qcow2", '+16M');
Instar::resize("$d/ri.qcow2", 16 << 20, relative => 1);
ok(same_image("$d/rq.qcow2", "$d/ri.qcow2"), 'resize +16M like qemu-img');
is(Instar::info("$d/ri.qcow2")->{'virtual-size'}, 48 << 20, '... to 48M');
qimg_ok('resize', '--shrink', "$d/rq.qcow2", '16M');
Instar::resize("$d/ri.qcow2", 16 << 20, shrink => 1);
ok(same_image("$d/rq.qcow2", "$d/ri.qcow2"), 'resize --shrink');
(undef, undef, $qerr) = qimg('resize', "$d/rq.qcow2", '8M');
eval { Instar::resize("$d/ri.qcow2", 8 << 20) };
is(join('', map { "qemu-img: $_\n" } split /\n/, "$@"), $qerr, 'shrink without the flag: qemu-img\'s message');

# amend
copy("$d/src.qcow2", "$_") or die for "$d/aq.qcow2", "$d/ai.qcow2";
qimg_ok('amend', '-o', 'lazy_refcounts=on', "$d/aq.qcow2");
Instar::amend("$d/ai.qcow2", options => 'lazy_refcounts=on');
is_deeply(Instar::info("$d/ai.qcow2")->{'format-specific'}, qimg_json('info', '--output=json', "$d/aq.qcow2")->{'format-specific'},
    'amend lazy_refcounts=on like qemu-img');
(undef, undef, $qerr) = qimg('amend', '-o', 'cluster_size=4k', "$d/aq.qcow2");
eval { Instar::amend("$d/ai.qcow2", options => 'cluster_size=4k') };
is("qemu-img: $@\n", $qerr, 'amend error: qemu-img\'s message');

# compare
my ($qrc, $qout) = qimg('compare', "$d/src.qcow2", "$d/c.raw");
my $cmp = Instar::compare("$d/src.qcow2", "$d/c.raw");
is($cmp->{identical}, 1, 'compare: identical');
is($cmp->{message}, $qout, '... with qemu-img\'s message');
($qrc, $qout) = qimg('compare', "$d/src.qcow2", "$d/snap.raw");
$cmp = Instar::compare("$d/src.qcow2", "$d/snap.raw", format2 => 'raw');
is($cmp->{identical}, 0, 'compare: different');
is($cmp->{message}, $qout, '... with qemu-img\'s message');
ok(is_int_sv($cmp->{mismatch_offset}), '... offset is an integer');
($qrc, $qout) = qimg('compare', '-s', "$d/src.qcow2", "$d/c.qcow2");
$cmp = Instar::compare("$d/src.qcow2", "$d/c.qcow2", strict => 1);
is($cmp->{message}, $qout, 'compare -s: qemu-img\'s message');

done_testing;
