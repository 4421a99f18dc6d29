use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use Instar::PVE;
use File::Copy qw(copy);
use File::stat ();
use JSON::PP;

# Each drop-in is compared with Proxmox's code path running the real qemu-img on the same images: the command
# line PVE builds, run the way PVE::Tools::run_command runs it (t/lib/InstarTest.pm's pve_run), and the
# result, the die message, the warnings and the STDERR text PVE would see.

my $d = scratch();
sub slurp { open(my $fh, '<:raw', $_[0]) or die "$_[0]: $!"; local $/; return scalar <$fh>; }

# Runs $code; returns (result or undef, die text, warnings joined, STDERR text, STDOUT text).
sub observe {
    my ($code) = @_;
    my @warn;
    local $SIG{__WARN__} = sub { push @warn, $_[0] };
    my $out = '';
    my ($stderr, $err, $res);
    {
        open(my $saved, '>&', \*STDOUT) or die;
        my $ofile = "$d/stdout.$$";
        open(STDOUT, '>', $ofile) or die;
        ($stderr, $err, $res) = capture_stderr($code);
        STDOUT->flush;
        open(STDOUT, '>&', $saved) or die;
        $out = slurp($ofile);
        unlink $ofile;
    }
    return ($res, "$err", join('', @warn), $stderr, $out);
}

# ---- the Proxmox code paths, with /usr/bin/qemu-img ----

sub pve_qemu_img_info {
    my ($filename, $file_format, $timeout, $follow) = @_;
    my $cmd = ['/usr/bin/qemu-img', 'info', '--output=json', ($file_format ? ('-f', $file_format) : ()),
        ($follow ? ('--backing-chain') : ()), '--', $filename];
    my $json = '';
    my $err_output = '';
    eval { $json = pve_run($cmd, errfunc => sub { $err_output .= shift . "\n" }) };
    warn $@ if $@;
    if ($err_output) {
        die $err_output if !$json;
        warn $err_output;
    }
    return $json;
}

sub pve_qemu_img_measure {
    my ($size, $fmt, $timeout, $options) = @_;
    my $cmd = ['/usr/bin/qemu-img', 'measure', '--output=json', '--size', "${size}K", '-O', $fmt,
        ($options && @$options ? ('-o', join(',', @$options)) : ())];
    my $json = '';
    my $err_output = '';
    eval { $json = pve_run($cmd, errfunc => sub { $err_output .= shift . "\n" }) };
    warn $@ if $@;
    if ($err_output) {
        die $err_output if !$json;
        warn $err_output;
    }
    return $json;
}

# a PVE sub that runs one command: print its stdout, send stderr to STDERR, die like run_command
sub pve_cmd {
    my ($cmd, %p) = @_;
    my $errtext = '';
    my $out = eval { pve_run($cmd, %p, stderr_out => \$errtext) };
    my $err = $@;
    print STDERR $errtext;
    print $out if defined $out && !$p{quiet};
    die $err if $err;
    return 0;
}

# ---- qemu_img_info / qemu_img_info_struct ----

qimg_ok('create', '-f', 'qcow2', "$d/base.qcow2", '64M');
qemu_io('-c', 'write -P 5 0 2M', "$d/base.qcow2");
qimg_ok('snapshot', '-c', 'snap', "$d/base.qcow2");
qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/base.qcow2", "$d/top.qcow2");
qimg_ok('create', '-f', 'raw', "$d/disk.raw", '10M');
mkdir "$d/subvol";
qimg_ok('create', '-f', 'qcow2', '-o', "data_file=$d/df.raw", "$d/df.qcow2", '1M');

for my $case (
    ["$d/base.qcow2", 'qcow2', 10, undef], ["$d/base.qcow2", undef, undef, undef],
    ["$d/top.qcow2", 'qcow2', 5, 1], ["$d/disk.raw", 'raw', 5, undef], ["$d/disk.raw", 'qcow2', 5, undef],
    ["$d/missing.qcow2", 'qcow2', 5, undef], ["$d/df.qcow2", undef, 5, undef],
) {
    my ($f, $fmt, $t, $follow) = @$case;
    my $name = join(' ', map { $_ // 'undef' } $f =~ s{.*/}{}r, $fmt, $t, $follow);
    my @mine = observe(sub { Instar::PVE::qemu_img_info($f, $fmt, $t, $follow) });
    my @theirs = observe(sub { pve_qemu_img_info($f, $fmt, $t, $follow) });
    is_deeply(\@mine, \@theirs, "qemu_img_info($name): same JSON text, die, warnings and output");
    if (!$theirs[1]) {
        my $s = Instar::PVE::qemu_img_info_struct($f, $fmt, $t, $follow);
        is_deeply($s, decode_json($theirs[0]), "qemu_img_info_struct($name) = decode_json of it");
    }
}

# ---- qemu_img_create / qemu_img_create_qcow2_backed ----

for my $case (['qcow2', 65536, { preallocation => 'metadata' }], ['qcow2', 20480, {}], ['raw', 4096, {}],
              ['raw', 4096, { preallocation => 'falloc' }], ['raw', 4096, { preallocation => 'metadata' }],
              ['qcow2', 'x12', {}]) {
    my ($fmt, $kib, $o) = @$case;
    my $name = "$fmt $kib " . join(',', %$o);
    my @mine = observe(sub { Instar::PVE::qemu_img_create($fmt, $kib, "$d/ci.$fmt", $o) });
    my @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'create', (defined $o->{preallocation} ? ('-o', "preallocation=$o->{preallocation}") : ()),
            '-f', $fmt, '--', "$d/cq.$fmt", "${kib}K"], errmsg => 'unable to create image', quiet => 1);
    });
    s{/cq\.}{/ci.}g for @theirs[1, 3];
    is_deeply([@mine[0 .. 3]], [@theirs[0 .. 3]], "qemu_img_create($name): same result and die");
    ok(slurp("$d/ci.$fmt") eq slurp("$d/cq.$fmt"), "qemu_img_create($name): the same file") if !$theirs[1];
    unlink "$d/ci.$fmt", "$d/cq.$fmt";
}
{
    my @mine = observe(sub { Instar::PVE::qemu_img_create('raw', 1024, "$d/nodir/x.raw", {}) });
    my @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'create', '-f', 'raw', '--', "$d/nodir/x.raw", '1024K'],
            errmsg => 'unable to create image', quiet => 1) });
    is($mine[1], $theirs[1], 'qemu_img_create into a missing directory: the same die');
    @mine = observe(sub { Instar::PVE::qemu_img_create('qcow2', 1024, "$d/nodir/x.qcow2", {}) });
    @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'create', '-f', 'qcow2', '--', "$d/nodir/x.qcow2", '1024K'],
            errmsg => 'unable to create image', quiet => 1) });
    is($mine[1], $theirs[1], 'qemu_img_create qcow2 into a missing directory: the same die');
    @mine = observe(sub { Instar::PVE::qemu_img_create('raw', 1024, "$d/fmt-i.raw", {}) });
    @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'create', '-f', 'raw', '--', "$d/fmt-i.raw", '1024K'],
            errmsg => 'unable to create image') });
    is($mine[4], $theirs[4], 'qemu_img_create: the same STDOUT (the "Formatting ..." line)');
    @mine = observe(sub { Instar::PVE::qemu_img_create('qcow2', 1024, "$d/fmt-i.qcow2", { preallocation => 'full' }) });
    @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'create', '-o', 'preallocation=full', '-f', 'qcow2', '--', "$d/fmt-q.qcow2",
            '1024K'], errmsg => 'unable to create image') });
    s{/fmt-i\.qcow2}{/fmt-q.qcow2}g for @mine[1 .. 4];
    is($mine[4], $theirs[4], 'qemu_img_create qcow2 with preallocation: the same STDOUT');
}

{
    Instar::PVE::qemu_img_create_qcow2_backed("$d/bi.qcow2", "$d/base.qcow2", 'qcow2', {});
    pve_cmd(['/usr/bin/qemu-img', 'create', '-F', 'qcow2', '-b', "$d/base.qcow2", '-f', 'qcow2', '-o',
        'extended_l2=on,cluster_size=128k', '--', "$d/bq.qcow2"], errmsg => 'unable to create image', quiet => 1);
    ok(slurp("$d/bi.qcow2") eq slurp("$d/bq.qcow2"), 'qemu_img_create_qcow2_backed: the same file');
    Instar::PVE::qemu_img_create_qcow2_backed("$d/bi2.qcow2", "$d/base.qcow2", 'qcow2', { preallocation => 'metadata' });
    pve_cmd(['/usr/bin/qemu-img', 'create', '-F', 'qcow2', '-b', "$d/base.qcow2", '-f', 'qcow2', '-o',
        'extended_l2=on,cluster_size=128k,preallocation=metadata', '--', "$d/bq2.qcow2"], errmsg => 'unable to create image', quiet => 1);
    ok(slurp("$d/bi2.qcow2") eq slurp("$d/bq2.qcow2"), 'qemu_img_create_qcow2_backed with preallocation: the same file');
    my @mine = observe(sub { Instar::PVE::qemu_img_create_qcow2_backed("$d/bx.qcow2", "$d/nope.qcow2", 'qcow2', {}) });
    my @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'create', '-F', 'qcow2', '-b', "$d/nope.qcow2", '-f', 'qcow2', '-o',
            'extended_l2=on,cluster_size=128k', '--', "$d/bx.qcow2"], errmsg => 'unable to create image', quiet => 1) });
    is_deeply([@mine[1, 3]], [@theirs[1, 3]], 'qemu_img_create_qcow2_backed with a missing backing file: the same die');
}

# ---- qemu_img_measure ----

for my $case ([1048576, 'qcow2', 5, undef], [1048576, 'qcow2', 5, ['cluster_size=128k', 'extended_l2=on']],
              [4096, 'raw', 5, []], [1024, 'qcow2', 5, ['bogus=1']]) {
    my $name = join(' ', $case->[0], $case->[1], @{ $case->[3] // [] });
    my @mine = observe(sub { Instar::PVE::qemu_img_measure(@$case) });
    my @theirs = observe(sub { pve_qemu_img_measure(@$case) });
    is_deeply(\@mine, \@theirs, "qemu_img_measure($name): same JSON text, die and warnings");
}
like((observe(sub { Instar::PVE::qemu_img_measure(1, undef) }))[1], qr/^format is missing/, 'measure without format dies');

# ---- qemu_img_resize ----

for my $case ([qcow2 => 128 << 20, undef], [qcow2 => 32 << 20, undef], [raw => 20 << 20, 'falloc'], [qcow2 => 100, undef]) {
    my ($fmt, $size, $prealloc) = @$case;
    my $src = $fmt eq 'raw' ? "$d/disk.raw" : "$d/base.qcow2";
    copy($src, "$d/ri.$fmt") or die;
    copy($src, "$d/rq.$fmt") or die;
    my @mine = observe(sub { Instar::PVE::qemu_img_resize("$d/ri.$fmt", $fmt, $size, $prealloc, 10) });
    my @theirs = observe(sub {
        pve_cmd(['/usr/bin/qemu-img', 'resize', ($prealloc ? ("--preallocation=$prealloc") : ()), '-f', $fmt, '--',
            "$d/rq.$fmt", $size], timeout => 10) });
    s{/rq\.}{/ri.}g for @theirs[1, 3];
    is_deeply(\@mine, \@theirs, "qemu_img_resize($fmt $size): same result, die, STDERR and STDOUT");
    ok(same_image("$d/ri.$fmt", "$d/rq.$fmt", '-s'), "qemu_img_resize($fmt $size): the same image");
}

# ---- file_size_info ----

{
    my $ctime = sub { File::stat::stat($_[0])->ctime };
    my $qi = decode_json(qimg_ok('info', '--output=json', '-f', 'qcow2', "$d/base.qcow2"));
    is_deeply([Instar::PVE::file_size_info("$d/base.qcow2", 5, 'qcow2')],
        [@{$qi}{qw(virtual-size format actual-size)}, undef, $ctime->("$d/base.qcow2")], 'file_size_info: list');
    is(scalar(Instar::PVE::file_size_info("$d/base.qcow2", 5, 'qcow2')), $qi->{'virtual-size'}, 'file_size_info: scalar');
    my $qt = decode_json(qimg_ok('info', '--output=json', "$d/top.qcow2"));
    is((Instar::PVE::file_size_info("$d/top.qcow2", 5, 'auto-detect'))[3], $qt->{'backing-filename'},
        'file_size_info: the parent');
    is_deeply([Instar::PVE::file_size_info("$d/subvol", 5, 'subvol')], [0, 'subvol', 0, undef, $ctime->("$d/subvol")],
        'file_size_info: a directory is a subvol');
    my @o = observe(sub { Instar::PVE::file_size_info("$d/top.qcow2", 5, 'qcow2', 1) });
    is($o[1], "backing file not allowed for untrusted image '$d/top.qcow2'!\n", 'untrusted: no backing file');
    @o = observe(sub { Instar::PVE::file_size_info("$d/df.qcow2", 5, 'qcow2', 1) });
    is($o[1], "$d/df.qcow2: 'data-file' references are not allowed!\n", 'untrusted: no data-file');
    @o = observe(sub { Instar::PVE::file_size_info("$d/missing", 5, 'qcow2') });
    is_deeply([@o[0 .. 2]], [undef, '', "failed to stat '$d/missing'\n"], 'a missing file warns and returns undef');
    @o = observe(sub { Instar::PVE::file_size_info("$d/missing", 5, 'raw', 1) });
    is($o[1], "failed to stat '$d/missing'\n", 'untrusted: a missing file dies');
    @o = observe(sub { Instar::PVE::file_size_info("$d/disk.raw", 5, 'raw', 1) });
    is_deeply([Instar::PVE::file_size_info("$d/disk.raw", 5, 'raw', 1)],
        [10 << 20, 'raw', decode_json(qimg_ok('info', '--output=json', "$d/disk.raw"))->{'actual-size'}, undef,
         $ctime->("$d/disk.raw")], 'untrusted raw image passes');
    @o = observe(sub { Instar::PVE::file_size_info("$d/disk.raw", 5, 'qcow2', 1) });
    like($o[1], qr/^failed to query file information with qemu-img\n/, 'untrusted, wrong format: dies');
    like($o[2], qr/Image is not in qcow2 format/, '... after warning qemu-img\'s message (list_images matches on it)');
}

# ---- snapshots, commit, rebase: the same images and the same dies ----

copy("$d/base.qcow2", "$d/si.qcow2") or die;
copy("$d/base.qcow2", "$d/sq.qcow2") or die;
for my $step (['volume_snapshot', '-c', 'pve1'], ['volume_snapshot', '-c', 'pve2'],
              ['volume_snapshot_rollback', '-a', 'pve1'], ['volume_snapshot_delete', '-d', 'pve2'],
              ['volume_snapshot_delete', '-d', 'nope'], ['volume_snapshot_rollback', '-a', 'nope']) {
    my ($sub, $flag, $snap) = @$step;
    qemu_io('-c', sprintf('write -P 0x%02x 0 64k', 0x40 + length($snap) + ($snap =~ /2/ ? 1 : 0)), "$d/si.qcow2")
        if $flag eq '-c';
    copy("$d/si.qcow2", "$d/sq.qcow2") or die if $flag eq '-c';
    my @mine = observe(sub { no strict 'refs'; &{"Instar::PVE::$sub"}("$d/si.qcow2", $snap) });
    my @theirs = observe(sub { pve_cmd(['/usr/bin/qemu-img', 'snapshot', $flag, $snap, "$d/sq.qcow2"]) });
    s{/sq\.}{/si.}g for @theirs[1, 3];
    is_deeply([@mine[1 .. 4]], [@theirs[1 .. 4]], "$sub $snap: same die, warnings, STDERR and STDOUT");
    ok(same_image("$d/si.qcow2", "$d/sq.qcow2"), "$sub $snap: the same guest contents");
    is_deeply([map { $_->{name} } @{ Instar::snapshot_list("$d/si.qcow2") }],
        [map { $_->{name} } @{ qimg_json('info', '--output=json', "$d/sq.qcow2")->{snapshots} // [] }],
        "$sub $snap: the same snapshots");
}

for my $p (qw(i q)) {
    qimg_ok('create', '-f', 'qcow2', "$d/$p-b.qcow2", '16M');
    qemu_io('-c', 'write -P 1 0 4M', "$d/$p-b.qcow2");
    qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/$p-b.qcow2", "$d/$p-m.qcow2");
    qemu_io('-c', 'write -P 2 2M 4M', "$d/$p-m.qcow2");
    qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/$p-m.qcow2", "$d/$p-t.qcow2");
    qemu_io('-c', 'write -P 3 5M 4M', "$d/$p-t.qcow2");
}
{
    my @mine = observe(sub { Instar::PVE::qemu_img_rebase("$d/i-t.qcow2", "$d/i-b.qcow2", 'qcow2', 'qcow2') });
    my @theirs = observe(sub { pve_cmd(['/usr/bin/qemu-img', 'rebase', '-b', "$d/q-b.qcow2", '-F', 'qcow2', '-f', 'qcow2', "$d/q-t.qcow2"]) });
    is_deeply([@mine[1 .. 3]], [@theirs[1 .. 3]], 'qemu_img_rebase: same (no) die and output');
    ok(same_image("$d/i-t.qcow2", "$d/q-t.qcow2"), 'qemu_img_rebase: the same contents');
    is(Instar::info("$d/i-t.qcow2")->{'backing-filename'}, "$d/i-b.qcow2", 'qemu_img_rebase: the new backing file');
    @mine = observe(sub { Instar::PVE::qemu_img_commit("$d/i-m.qcow2") });
    @theirs = observe(sub { pve_cmd(['/usr/bin/qemu-img', 'commit', "$d/q-m.qcow2"]) });
    is_deeply([@mine[1 .. 4]], [@theirs[1 .. 4]], 'qemu_img_commit: same output ("Image committed.")');
    ok(same_image("$d/i-b.qcow2", "$d/q-b.qcow2"), 'qemu_img_commit: the same base');
    is((qimg('check', "$d/i-b.qcow2"))[0], 0, 'qemu_img_commit: base checks clean');
    @mine = observe(sub { Instar::PVE::qemu_img_commit("$d/i-b.qcow2") });
    @theirs = observe(sub { pve_cmd(['/usr/bin/qemu-img', 'commit', "$d/q-b.qcow2"]) });
    s{/q-}{/i-}g for @theirs[1, 3];
    is_deeply([@mine[1 .. 3]], [@theirs[1 .. 3]], 'qemu_img_commit without backing: same die and STDERR');
}

# ---- a timeout is honoured by the library: the call stops at the deadline, the chain stays valid ----
{
    qimg_ok('create', '-f', 'qcow2', "$d/to-b.qcow2", '16M');
    qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/to-b.qcow2", "$d/to-t.qcow2");
    qemu_io('-c', 'write -P 7 0 8M', "$d/to-t.qcow2");
    copy("$d/to-t.qcow2", "$d/to-ref.qcow2") or die;
    qimg_ok('rebase', '-u', '-F', 'qcow2', '-b', "$d/to-b.qcow2", "$d/to-ref.qcow2");
    my @o = observe(sub { Instar::PVE::qemu_img_commit("$d/to-t.qcow2", 1e-6) });
    is($o[1], "command '/usr/bin/qemu-img commit $d/to-t.qcow2' failed: got timeout\n",
        'qemu_img_commit past its timeout: run_command\'s timeout die');
    is((qimg('check', "$d/to-b.qcow2"))[0], 0, '... the base checks clean');
    ok(same_image("$d/to-t.qcow2", "$d/to-ref.qcow2"), '... and the top still reads the same');
    @o = observe(sub { Instar::PVE::qemu_img_rebase("$d/to-t.qcow2", '', 'qcow2', 'qcow2', 1e-6) });
    like($o[1], qr/^command '.*rebase.*' failed: got timeout\n\z/, 'qemu_img_rebase past its timeout');
    is(Instar::info("$d/to-t.qcow2")->{'backing-filename'}, "$d/to-b.qcow2", '... the backing file is unchanged');
    ok(same_image("$d/to-t.qcow2", "$d/to-ref.qcow2"), '... and the contents too');
}

# ---- info, measure and resize take $timeout as the library's time limit ----
{
    # A vmdk of 4096 flat extents: opening them all takes far longer than a 1 ms limit on any machine.
    mkdir "$d/vx" or die;
    Instar::create("$d/vx/t.vmdk", format => 'vmdk', size => 8 << 40, options => 'subformat=twoGbMaxExtentFlat');
    my @o = observe(sub { Instar::PVE::qemu_img_info("$d/vx/t.vmdk", 'vmdk', 0.001) });
    is($o[0], '', 'qemu_img_info past its timeout: the empty string run_qemu_img_json returns');
    is($o[2], "command '/usr/bin/qemu-img info --output=json -f vmdk -- $d/vx/t.vmdk' failed: got timeout\n",
        '... and the warning run_command\'s timeout gives');
    is($o[1], '', '... without dying');
    @o = observe(sub { Instar::PVE::qemu_img_info_struct("$d/vx/t.vmdk", 'vmdk', 0.001) });
    ok(!defined($o[0]) && $o[1] eq '' && $o[2] =~ /failed: got timeout\n\z/, 'qemu_img_info_struct: undef');
    my $e = do { eval { Instar::info("$d/vx/t.vmdk", timeout => 0.001) }; $@ };
    ok(ref($e) && $e->code == Instar::E_LIMIT, 'Instar::info past its timeout dies with E_LIMIT');
    like("$e", qr/Operation stopped: its time limit of 1 ms is reached$/, '... and says so');
    is(Instar::PVE::qemu_img_info("$d/vx/t.vmdk", 'vmdk', 600), pve_qemu_img_info("$d/vx/t.vmdk", 'vmdk', 600),
        'qemu_img_info of it within its timeout: qemu-img\'s JSON');
    unlink glob("$d/vx/*");
    rmdir "$d/vx";
    # A chain within the limit: the same results as without one.
    Instar::create("$d/ch0.qcow2", format => 'qcow2', size => 1 << 20);
    for my $i (1 .. 20) {
        Instar::create("$d/ch$i.qcow2", format => 'qcow2', backing_file => "ch" . ($i - 1) . ".qcow2",
            backing_format => 'qcow2');
    }
    # Within the limit: the same results as without one.
    is(Instar::PVE::qemu_img_info("$d/ch20.qcow2", 'qcow2', 600, 1),
        pve_qemu_img_info("$d/ch20.qcow2", 'qcow2', 600, 1), 'qemu_img_info within its timeout: qemu-img\'s JSON');
    is(Instar::PVE::qemu_img_measure(1024, 'qcow2', 600), pve_qemu_img_measure(1024, 'qcow2', 600),
        'qemu_img_measure within its timeout: qemu-img\'s JSON');
    qimg_ok('create', '-f', 'qcow2', "$d/rt.qcow2", '1M');
    @o = observe(sub { Instar::PVE::qemu_img_resize("$d/rt.qcow2", 'qcow2', 2 << 20, undef, 600) });
    is($o[4], "Image resized.\n", 'qemu_img_resize within its timeout');
    is(Instar::info("$d/rt.qcow2")->{'virtual-size'}, 2 << 20, '... resized');
    # A convert past its limit: E_LIMIT, and the target holds no corruption.
    qimg_ok('create', '-f', 'raw', "$d/big.raw", '256M');
    qemu_io('-f', 'raw', '-c', 'write -P 0x5a 0 256M', "$d/big.raw");
    $e = do { eval { Instar::convert("$d/big.raw", "$d/big.qcow2", target_format => 'qcow2',
        timeout => 0.001) }; $@ };
    ok(ref($e) && $e->code == Instar::E_LIMIT, 'convert of 256 MiB with a 1 ms limit dies with E_LIMIT');
    is((qimg('check', "$d/big.qcow2"))[0], 0, '... and what it left checks clean') if -e "$d/big.qcow2";
    unlink "$d/big.raw", "$d/big.qcow2";
}

# ---- QemuImage::convert (paths) and the EFI-disk dd ----

{
    qimg_ok('create', '-f', 'qcow2', "$d/cv.qcow2", '32M');
    qemu_io('-c', 'write -P 0x31 0 3M', '-c', 'write -P 0x32 20M 1M', "$d/cv.qcow2");
    qimg_ok('snapshot', '-c', 'before', "$d/cv.qcow2");
    qemu_io('-c', 'write -P 0x33 0 1M', "$d/cv.qcow2");
    my $size = 32 << 20;
    for my $opts ({}, { snapname => 'before' }, { bwlimit => 1 << 20 }, { 'is-zero-initialized' => 1 }) {
        my $name = join(',', %$opts) || 'plain';
        qimg_ok('create', '-f', 'raw', "$d/ti.raw", $size);
        qimg_ok('create', '-f', 'raw', "$d/tq.raw", $size);
        my @mine = observe(sub { Instar::PVE::convert("$d/cv.qcow2", "$d/ti.raw", $size, $opts) });
        my @theirs = observe(sub {
            my @cmd = ('/usr/bin/qemu-img', 'convert', '-p', '-n',
                ($opts->{snapname} ? ('-l', "snapshot.name=$opts->{snapname}") : ()),
                (defined $opts->{bwlimit} ? ('-r', "$opts->{bwlimit}K") : ()), '-f', 'qcow2', '-O', 'raw',
                # Debian's qemu-img has no zeroinit: filter (a Proxmox patch); --target-is-zero is its stock twin
                ($opts->{'is-zero-initialized'} ? ('--target-is-zero') : ()), "$d/cv.qcow2", "$d/tq.raw");
            my $out = pve_run(\@cmd);
            for my $line (split /[\r\n]+/, $out) {
                next if $line !~ m/\((\S+)\/100\%\)/;
                my $percent = $1;
                my $transferred = int($size * $percent / 100);
                print "transferred " . Instar::PVE::_render_bytes($transferred, 1) . " of "
                    . Instar::PVE::_render_bytes($size, 1) . " ($percent%)\n";
            }
        });
        is($mine[1], $theirs[1], "convert($name): no die");
        is($mine[4], $theirs[4], "convert($name): the progress lines qemu-server prints");
        ok(same_image("$d/ti.raw", "$d/tq.raw"), "convert($name): the same target contents");
    }
    my @seen;
    qimg_ok('create', '-f', 'raw', "$d/ti.raw", $size);
    Instar::PVE::convert("$d/cv.qcow2", "$d/ti.raw", $size, { progress => sub { push @seen, [@_]; 0 } });
    is_deeply($seen[-1], ['100.00', $size, $size], 'convert: progress callback gets (percent, transferred, total)');
    my @mine = observe(sub { Instar::PVE::convert("$d/cv.qcow2", "$d/ti.raw", $size, { progress => sub { 1 } }) });
    like($mine[1], qr/^copy failed: command '.*' failed: exit code 1\n\z/, 'convert cancelled: "copy failed: ..."');
    @mine = observe(sub { Instar::PVE::convert("$d/nope.qcow2", "$d/ti.raw", $size, {}) });
    is($mine[1], "source '$d/nope.qcow2' is not a valid volid nor path for qemu-img convert\n", 'convert: bad source');
}
{
    qimg_ok('create', '-f', 'raw', "$d/efi-src.raw", '528K');
    qemu_io('-f', 'raw', '-c', 'write -P 0x45 0 528k', "$d/efi-src.raw");
    qimg_ok('create', '-f', 'qcow2', "$d/efi-i.qcow2", '1M');
    qimg_ok('create', '-f', 'qcow2', "$d/efi-q.qcow2", '1M');
    my @mine = observe(sub { Instar::PVE::qemu_img_dd("$d/efi-src.raw", 'raw', "$d/efi-i.qcow2", 'qcow2', 540672) });
    # Debian's qemu-img dd has neither -n nor osize= (Proxmox patches): the reference is a stock dd of the
    # source, whose contents the existing 1M target must now start with (and read zeroes after)
    my @theirs = observe(sub { pve_cmd(['qemu-img', 'dd', '-f', 'raw', '-O', 'qcow2', 'bs=1M',
        "if=$d/efi-src.raw", "of=$d/efi-q.qcow2"]) });
    is_deeply([@mine[1 .. 3]], [@theirs[1 .. 3]], 'qemu_img_dd: same (no) die and output');
    is(Instar::info("$d/efi-i.qcow2")->{'virtual-size'}, 1 << 20, 'qemu_img_dd: the target keeps its size');
    ok(same_image("$d/efi-i.qcow2", "$d/efi-q.qcow2"), 'qemu_img_dd: the EFI vars copied (rest reads zeroes)');
    is((qimg('check', "$d/efi-i.qcow2"))[0], 0, 'qemu_img_dd: the target checks clean');
    @mine = observe(sub { Instar::PVE::qemu_img_dd("$d/nope.raw", 'raw', "$d/efi-i.qcow2", 'qcow2', 540672) });
    @theirs = observe(sub { pve_cmd(['qemu-img', 'dd', '-f', 'raw', '-O', 'qcow2', 'bs=1M',
        "if=$d/nope.raw", "of=$d/efi-x.qcow2"]) });
    is($mine[3], $theirs[3], 'qemu_img_dd of a missing source: the same STDERR');
    is($mine[1], "command 'qemu-img dd -n -f raw -O qcow2 bs=1M osize=540672 if=$d/nope.raw of=$d/efi-i.qcow2' "
        . "failed: exit code 1\n", '... and run_command\'s die');
}

done_testing;
