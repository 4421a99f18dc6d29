package Instar::PVE;

# Drop-in replacements for the qemu-img calls of Proxmox VE (pve-storage's PVE::Storage::Common and
# PVE::Storage::Plugin, qemu-server's PVE::QemuServer::QemuImage), running libinstar in-process instead of
# /usr/bin/qemu-img. Same names, arguments and results; failures die with the text PVE's run_command produces
# for the same qemu-img failure. Written from the documented contracts of those modules, not from their code.

use strict;
use warnings;

use Fcntl qw(S_ISDIR);
use File::stat ();
use Time::HiRes ();

use Instar;

our $VERSION = $Instar::VERSION;

use Exporter 'import';
our @EXPORT_OK = qw(
    qemu_img_create qemu_img_create_qcow2_backed qemu_img_info qemu_img_info_struct qemu_img_measure
    qemu_img_resize file_size_info volume_snapshot volume_snapshot_rollback volume_snapshot_delete
    qemu_img_commit qemu_img_rebase convert qemu_img_dd
);

# ---- how PVE::Tools::run_command reports a failed qemu-img ----

# One argument as String::ShellQuote quotes it (run_command's command string).
sub _shellquote {
    my ($s) = @_;
    return "''" if $s eq '';
    return $s if $s !~ m|[^\w!%+,\-./:=@^]|;
    $s =~ s/'/'\\''/g;
    return "'$s'";
}

sub _cmdstr { return join(' ', map { _shellquote($_) } @{ $_[0] }); }

# qemu-img's stderr lines for an error message: "qemu-img: " before the first line, and before the others
# only where qemu reports them as errors of their own (warnings, the option and size explanations); other
# continuation lines are qemu's hints, printed bare.
sub _stderr_lines {
    my ($err) = @_;
    my $msg = ref($err) ? $err->message : "$err";
    chomp $msg;
    my ($first, @rest) = split(/\n/, $msg, -1);
    $first //= '';
    my $each = $msg =~ /\n(?:warning: |Invalid options for |kilobytes, megabytes)/;
    return ("qemu-img: $first", map { $each ? "qemu-img: $_" : $_ } @rest);
}

sub _is_instar_error { return ref($_[0]) && eval { $_[0]->isa('Instar::Error') }; }

# What qemu-img printed on stdout before it failed (create's "Formatting ..." line): run_command copies it out.
sub _print_output {
    my ($err) = @_;
    print $err->{output} if _is_instar_error($err) && defined $err->{output};
}

# run_command($cmd) without errmsg: stderr goes to our STDERR, then "command '...' failed: exit code 1".
sub _fail_plain {
    my ($cmd, $err) = @_;
    die $err if !_is_instar_error($err);
    if ($err->{timeout} || $err->code == Instar::E_LIMIT) {
        die "command '" . _cmdstr($cmd) . "' failed: got timeout\n";
    }
    print STDERR "$_\n" for _stderr_lines($err);
    die "command '" . _cmdstr($cmd) . "' failed: exit code 1\n";
}

# run_command($cmd, errmsg => $errmsg): earlier stderr lines go to STDERR, the last one ends the die message.
sub _fail_errmsg {
    my ($errmsg, $cmd, $err) = @_;
    die $err if !_is_instar_error($err);
    die "command '" . _cmdstr($cmd) . "' failed: got timeout\n" if $err->{timeout} || $err->code == Instar::E_LIMIT;
    my @lines = _stderr_lines($err);
    my $last = pop @lines;
    print STDERR "$_\n" for @lines;
    die "$errmsg: $last\n";
}

# A deadline for the operations that report progress: the library stops at the next report after it
# (nothing half-written: a created target is removed, copied data stays consistent), and the call fails as
# run_command's timeout does.
sub _deadline_progress {
    my ($timeout, $inner) = @_;
    return $inner if !$timeout;
    my $deadline = Time::HiRes::time() + $timeout;
    return sub {
        return 1 if Time::HiRes::time() > $deadline;
        return $inner ? $inner->(@_) : 0;
    };
}

sub _mark_timeout {
    my ($err, $timeout, $started) = @_;
    if (_is_instar_error($err) && $timeout && ($err->code == Instar::E_LIMIT
        || ($err->code == Instar::E_CANCELLED && Time::HiRes::time() - $started >= $timeout))) {
        $err->{timeout} = 1;
    }
    return $err;
}

# The JSON helpers' timeout: run_command's die is only warned about, qemu-img printed nothing, so the caller
# gets an empty string.
sub _json_timeout {
    my ($cmd) = @_;
    warn "command '" . _cmdstr($cmd) . "' failed: got timeout\n";
    return '';
}

# qemu-img's size argument "NNNK" (PVE passes KiB): bytes, or undef when qemu-img would reject it.
sub _kib_bytes {
    my ($size) = @_;
    return undef if !defined($size) || $size !~ /^\s*(\d+(?:\.\d+)?)\s*$/;
    my $b = $1 * 1024;
    return undef if $b >= 2**63;
    return int($b);
}

# ---- PVE::Storage::Common ----

sub qemu_img_create {
    my ($fmt, $size, $path, $options) = @_;
    my @o = defined($options->{preallocation}) ? ('-o', "preallocation=$options->{preallocation}") : ();
    my $cmd = ['/usr/bin/qemu-img', 'create', @o, '-f', $fmt, '--', $path, "${size}K"];
    my $bytes = _kib_bytes($size);
    eval {
        die Instar::Error->can('throw')->('Instar::Error', code => Instar::E_INVALID, errno => 0,
            message => "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                . "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            if !defined $bytes;
        print Instar::create_formatting($path, format => $fmt, size => $bytes,
            (defined($options->{preallocation}) ? (options => "preallocation=$options->{preallocation}") : ()));
    };
    if (my $err = $@) {
        _print_output($err);
        _fail_errmsg('unable to create image', $cmd, $err);
    }
    return 0;
}

sub qemu_img_create_qcow2_backed {
    my ($path, $backing_path, $backing_format, $options) = @_;
    my $opts = 'extended_l2=on,cluster_size=128k';
    $opts .= ",preallocation=$options->{preallocation}" if defined($options->{preallocation});
    my $cmd = ['/usr/bin/qemu-img', 'create', '-F', $backing_format, '-b', $backing_path, '-f', 'qcow2',
        '-o', $opts, '--', $path];
    eval {
        print Instar::create_formatting($path, format => 'qcow2', backing_file => $backing_path,
            backing_format => $backing_format, options => $opts);
    };
    if (my $err = $@) {
        _print_output($err);
        _fail_errmsg('unable to create image', $cmd, $err);
    }
    return 0;
}

sub _info_cmd {
    my ($filename, $file_format, $follow) = @_;
    return ['/usr/bin/qemu-img', 'info', '--output=json', ($file_format ? ('-f', $file_format) : ()),
        ($follow ? ('--backing-chain') : ()), '--', $filename];
}

# The JSON text of `qemu-img info --output=json [-f FMT] [--backing-chain]`, byte for byte. On failure it warns
# and dies as PVE's helper does (the warning names the command, the die carries qemu-img's stderr).
sub qemu_img_info {
    my ($filename, $file_format, $timeout, $follow_backing_files) = @_;
    my $json = eval {
        Instar::info_json($filename, ($file_format ? (format => $file_format) : ()),
            ($follow_backing_files ? (backing_chain => 1) : ()), ($timeout ? (timeout => $timeout) : ()));
    };
    if (my $err = $@) {
        die $err if !_is_instar_error($err);
        return _json_timeout(_info_cmd($filename, $file_format, $follow_backing_files))
            if $err->code == Instar::E_LIMIT;
        warn "command '" . _cmdstr(_info_cmd($filename, $file_format, $follow_backing_files))
            . "' failed: exit code 1\n";
        die join('', map { "$_\n" } _stderr_lines($err));
    }
    return $json;
}

# The same information already decoded (what PVE gets from decode_json(qemu_img_info(...))), built from the
# library's structs without a JSON round trip. An array reference with $follow_backing_files.
sub qemu_img_info_struct {
    my ($filename, $file_format, $timeout, $follow_backing_files) = @_;
    my $r = eval {
        Instar::info($filename, ($file_format ? (format => $file_format) : ()),
            ($follow_backing_files ? (backing_chain => 1) : ()), ($timeout ? (timeout => $timeout) : ()));
    };
    if (my $err = $@) {
        die $err if !_is_instar_error($err);
        if ($err->code == Instar::E_LIMIT) {
            _json_timeout(_info_cmd($filename, $file_format, $follow_backing_files));
            return undef;
        }
        warn "command '" . _cmdstr(_info_cmd($filename, $file_format, $follow_backing_files))
            . "' failed: exit code 1\n";
        die join('', map { "$_\n" } _stderr_lines($err));
    }
    return $r;
}

# The JSON text of `qemu-img measure --output=json --size ${size}K -O $fmt [-o ...]`.
sub qemu_img_measure {
    my ($size, $fmt, $timeout, $options) = @_;
    die "format is missing" if !$fmt;
    my @o = ($options && @$options) ? (options => join(',', @$options)) : ();
    my $cmd = ['/usr/bin/qemu-img', 'measure', '--output=json', '--size', "${size}K", '-O', $fmt,
        (@o ? ('-o', $o[1]) : ())];
    my $bytes = _kib_bytes($size);
    my $r = eval {
        die Instar::Error->can('throw')->('Instar::Error', code => Instar::E_INVALID, errno => 0,
            message => "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                . "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            if !defined $bytes;
        Instar::measure(undef, size => $bytes, output_format => $fmt, @o, ($timeout ? (timeout => $timeout) : ()));
    };
    if (my $err = $@) {
        die $err if !_is_instar_error($err);
        return _json_timeout($cmd) if $err->code == Instar::E_LIMIT;
        warn "command '" . _cmdstr($cmd) . "' failed: exit code 1\n";
        die join('', map { "$_\n" } _stderr_lines($err));
    }
    my $s = "{\n";
    $s .= "    \"bitmaps\": $r->{bitmaps},\n" if defined $r->{bitmaps};
    $s .= "    \"required\": $r->{required},\n    \"fully-allocated\": $r->{'fully-allocated'}\n}\n";
    return $s;
}

sub qemu_img_resize {
    my ($path, $format, $size, $preallocation, $timeout) = @_;
    die "format is missing" if !$format;
    $timeout = 10 if !$timeout;
    my $cmd = ['/usr/bin/qemu-img', 'resize', ($preallocation ? ("--preallocation=$preallocation") : ()),
        '-f', $format, '--', $path, $size];
    eval {
        my ($rel, $n) = ("$size" =~ /^([+-]?)(\d+)$/);
        die Instar::Error->can('throw')->('Instar::Error', code => Instar::E_INVALID, errno => 0,
            message => 'Invalid image size specified. Must be between 0 and 9223372036854775807.')
            if !defined $n;
        Instar::resize($path, $rel eq '-' ? -$n : $n, format => $format, relative => ($rel ne '' ? 1 : 0),
            ($preallocation ? (preallocation => $preallocation) : ()), timeout => $timeout);
    };
    _fail_plain($cmd, $@) if $@;
    print "Image resized.\n";
    return 0;
}

# ---- PVE::Storage::Plugin ----

my @checked_formats = qw(raw qcow qcow2 qed vmdk cloop);

# file_size_info($filename, $timeout, $file_format, $untrusted): ($size, $format, $used, $parent, $ctime) in
# list context, $size in scalar context, with Plugin.pm's checks of untrusted images (no data-file, at most one
# vmdk extent, no backing file).
sub file_size_info {
    my ($filename, $timeout, $file_format, $untrusted) = @_;

    warn "file_size_info: detected call without \$file_format parameter\n" if !defined($file_format);
    if (defined($file_format) && ($file_format eq '1' || $file_format eq '0')) {
        warn "file_size_info: detected call with legacy parameter order: \$untrusted before"
            . " \$file_format\n";
        $untrusted = $file_format;
        $file_format = undef;
    }
    $file_format = undef if $file_format && $file_format eq 'auto-detect';

    my $st = File::stat::stat($filename);
    if (!defined($st)) {
        my $extramsg = -l $filename ? ' - dangling symlink?' : '';
        my $msg = "failed to stat '$filename'$extramsg\n";
        die $msg if $untrusted;
        warn $msg;
        return undef;
    }

    my $soft = sub {
        my ($msg) = @_;
        die $msg if $untrusted;
        warn $msg;
        return wantarray ? (undef, undef, undef, undef, $st->ctime) : undef;
    };

    if (S_ISDIR($st->mode)) {
        return $soft->("expected format '$file_format', but '$filename' is a directory\n")
            if $file_format && $file_format ne 'subvol';
        return wantarray ? (0, 'subvol', 0, undef, $st->ctime) : 0;
    } elsif ($file_format && $file_format eq 'subvol') {
        return $soft->("expected format '$file_format', but '$filename' is not a directory\n");
    }

    if ($file_format && !grep { $_ eq $file_format } @checked_formats) {
        warn "file_size_info: '$filename': falling back to 'raw' from unknown format '$file_format'\n";
        $file_format = 'raw';
    }

    my $info = eval { qemu_img_info_struct($filename, $file_format, $timeout) };
    if (my $err = $@) {
        # PVE warns qemu-img's stderr and goes on with empty output
        warn $err;
        die "failed to query file information with qemu-img\n" if $untrusted;
        return wantarray ? (undef, undef, undef, undef, $st->ctime) : undef;
    }

    if ($untrusted) {
        if (my $fs = $info->{'format-specific'}) {
            if ($fs->{type} eq 'qcow2' && $fs->{data}->{'data-file'}) {
                die "$filename: 'data-file' references are not allowed!\n";
            } elsif ($fs->{type} eq 'vmdk') {
                my $extents = $fs->{data}->{extents} // [];
                my $children = $info->{children} // [];
                die "$filename: multiple children or extents are not allowed!\n"
                    if scalar(@$children) > 1 || scalar(@$extents) > 1;
            }
        }
    }

    my ($size, $format, $used, $parent) = @{$info}{qw(virtual-size format actual-size backing-filename)};
    die "backing file not allowed for untrusted image '$filename'!\n" if $untrusted && $parent;

    ($size) = (($size // '') =~ /^(\d+)$/);
    die "size '' not an integer\n" if !defined($size);
    $size = int($size);
    ($used) = (($used // '') =~ /^(\d+)$/);
    die "used '' not an integer\n" if !defined($used);
    $used = int($used);
    ($format) = ($format =~ /^(\S+)$/);
    die "format includes whitespace\n" if !defined($format);
    if (defined($parent)) {
        warn "strange parent name path '$parent' found\n" if $parent =~ m/[^\S]/;
        ($parent) = ($parent =~ /^(\S+)$/);
    }
    die "qemu-img bug: queried format does not match format in result '$file_format ne $format'"
        if $file_format && $file_format ne $format;

    return wantarray ? ($size, $format, $used, $parent, $st->ctime) : $size;
}

# The qemu-img calls of Plugin.pm's volume_snapshot / volume_snapshot_rollback / volume_snapshot_delete for
# internal qcow2 snapshots, on a path (`qemu-img snapshot -c|-a|-d SNAP PATH`).
sub volume_snapshot {
    my ($path, $snap) = @_;
    eval { Instar::snapshot_create($path, $snap) };
    _fail_plain(['/usr/bin/qemu-img', 'snapshot', '-c', $snap, $path], $@) if $@;
    return undef;
}

sub volume_snapshot_rollback {
    my ($path, $snap) = @_;
    eval { Instar::snapshot_apply($path, $snap) };
    _fail_plain(['/usr/bin/qemu-img', 'snapshot', '-a', $snap, $path], $@) if $@;
    return undef;
}

sub volume_snapshot_delete {
    my ($path, $snap) = @_;
    eval { Instar::snapshot_delete($path, $snap) };
    _fail_plain(['/usr/bin/qemu-img', 'snapshot', '-d', $snap, $path], $@) if $@;
    return undef;
}

# `qemu-img commit PATH` (snapshot-as-volume-chain: merge a snapshot into its backing file).
sub qemu_img_commit {
    my ($path, $timeout) = @_;
    my $t0 = Time::HiRes::time();
    eval {
        Instar::commit($path, ($timeout ? (timeout => $timeout, progress => _deadline_progress($timeout)) : ()));
    };
    _fail_plain(['/usr/bin/qemu-img', 'commit', $path], _mark_timeout($@, $timeout, $t0)) if $@;
    print "Image committed.\n";
    return undef;
}

# `qemu-img rebase -b PARENT -F PARENT_FMT -f FMT PATH` (safe mode: the guest contents stay the same).
sub qemu_img_rebase {
    my ($path, $backing_path, $backing_format, $format, $timeout) = @_;
    $backing_format //= 'qcow2';
    $format //= 'qcow2';
    my $t0 = Time::HiRes::time();
    eval {
        Instar::rebase($path, backing_file => $backing_path, backing_format => $backing_format,
            format => $format, ($timeout ? (timeout => $timeout, progress => _deadline_progress($timeout)) : ()));
    };
    _fail_plain(['/usr/bin/qemu-img', 'rebase', '-b', $backing_path, '-F', $backing_format, '-f', $format,
        $path], _mark_timeout($@, $timeout, $t0)) if $@;
    return undef;
}

# ---- qemu-server: PVE::QemuServer::QemuImage::convert and the EFI-disk `qemu-img dd` ----

sub _render_bytes {
    my ($value, $precision) = @_;
    if (eval { require PVE::Format; 1 }) {
        return PVE::Format::render_bytes($value, $precision);
    }
    my @units = qw(B KiB MiB GiB TiB PiB EiB);
    my $u = 0;
    while ($value >= 1024 && $u < $#units) { $value /= 1024; $u++; }
    return $u == 0 ? "$value B" : sprintf("%.${precision}f %s", $value, $units[$u]);
}

my $qemu_format_re = qr/(raw|cow|qcow|qcow2|qed|vmdk|cloop|vpc|vhdx|vdi|parallels|dmg|bochs)/;

# convert($src_volid, $dst_volid, $size, $opts), as qemu-server's QemuImage::convert: `qemu-img convert -p -n`
# into an existing target. Volume ids are resolved through PVE::Storage when it is loaded; plain paths work
# without it (the format from $opts->{'source-path-format'} / $opts->{'target-path-format'} or the file
# extension). $opts: bwlimit (KiB/s), snapname, is-zero-initialized, source-path-format, and (instar additions)
# progress => sub { my ($percent, $transferred, $total) = @_ } instead of the printed lines,
# target-path-format, source-cache, target-cache.
sub convert {
    my ($src_volid, $dst_volid, $size, $opts) = @_;
    $opts //= {};
    my ($bwlimit, $snapname) = @{$opts}{qw(bwlimit snapname)};

    my ($src_path, $src_format, $dst_path, $dst_format, $src_cache, $dst_cache);
    my $snapshot_ok = 1;
    my $have_storage = defined(&PVE::Storage::config) && defined(&PVE::Storage::parse_volume_id);
    my ($src_storeid, $dst_storeid);
    if ($have_storage) {
        ($src_storeid) = PVE::Storage::parse_volume_id($src_volid, 1);
        ($dst_storeid) = PVE::Storage::parse_volume_id($dst_volid, 1);
    }
    my $storecfg = ($src_storeid || $dst_storeid) ? PVE::Storage::config() : undef;
    if ($src_storeid) {
        PVE::Storage::activate_volumes($storecfg, [$src_volid], $snapname);
        my $scfg = PVE::Storage::storage_config($storecfg, $src_storeid);
        $src_format = defined(&PVE::QemuServer::Drive::checked_volume_format)
            ? PVE::QemuServer::Drive::checked_volume_format($storecfg, $src_volid)
            : (PVE::Storage::parse_volname($storecfg, $src_volid))[6];
        $src_path = PVE::Storage::path($storecfg, $src_volid, $snapname);
        $src_cache = 'none' if $scfg->{type} eq 'zfspool';
        if (defined(&PVE::Storage::volume_qemu_snapshot_method)) {
            my $m = PVE::Storage::volume_qemu_snapshot_method($storecfg, $src_volid);
            $snapshot_ok = $m && $m eq 'qemu';
        }
    } elsif (-f $src_volid || -b $src_volid) {
        $src_path = $src_volid;
        if ($opts->{'source-path-format'}) {
            $src_format = $opts->{'source-path-format'};
        } elsif ($src_path =~ m/\.$qemu_format_re$/) {
            $src_format = $1;
        }
    }
    die "source '$src_volid' is not a valid volid nor path for qemu-img convert\n" if !$src_path;

    if ($dst_storeid) {
        my $scfg = PVE::Storage::storage_config($storecfg, $dst_storeid);
        $dst_format = defined(&PVE::QemuServer::Drive::checked_volume_format)
            ? PVE::QemuServer::Drive::checked_volume_format($storecfg, $dst_volid)
            : (PVE::Storage::parse_volname($storecfg, $dst_volid))[6];
        $dst_path = PVE::Storage::path($storecfg, $dst_volid);
        $dst_cache = 'none' if $scfg->{type} eq 'zfspool';
    } elsif (!$have_storage && (-f $dst_volid || -b $dst_volid)) {
        $dst_path = $dst_volid;
        $dst_format = $opts->{'target-path-format'}
            // ($dst_path =~ m/\.$qemu_format_re$/ ? $1 : 'raw');
    }
    die "destination '$dst_volid' is not a valid volid form qemu-img convert\n" if !$dst_path;
    $src_cache = $opts->{'source-cache'} if defined $opts->{'source-cache'};
    $dst_cache = $opts->{'target-cache'} if defined $opts->{'target-cache'};

    my $use_snap = $snapname && ($src_format // '') eq 'qcow2' && $snapshot_ok;
    my $cmd = ['/usr/bin/qemu-img', 'convert', '-p', '-n'];
    push @$cmd, '-l', "snapshot.name=$snapname" if $use_snap;
    push @$cmd, '-t', $dst_cache if defined $dst_cache;
    push @$cmd, '-T', $src_cache if defined $src_cache;
    push @$cmd, '-r', "${bwlimit}K" if defined $bwlimit;
    push @$cmd, '-f', $src_format if $src_format;
    push @$cmd, '-O', $dst_format, $src_path;
    push @$cmd, $opts->{'is-zero-initialized'} ? "zeroinit:$dst_path" : $dst_path;

    my $user = $opts->{progress};
    my $progress = sub {
        my ($p) = @_;
        my $percent = sprintf('%.2f', $p);
        my $transferred = int($size * $percent / 100);
        if ($user) {
            return $user->($percent, $transferred, $size);
        }
        my $total_h = _render_bytes($size, 1);
        my $transferred_h = _render_bytes($transferred, 1);
        print "transferred $transferred_h of $total_h ($percent%)\n";
        return 0;
    };

    eval {
        Instar::convert($src_path, $dst_path,
            no_create => 1,
            target_format => $dst_format,
            ($src_format ? (source_format => $src_format) : ()),
            ($use_snap ? (snapshot => "snapshot.name=$snapname") : ()),
            (defined $dst_cache ? (target_cache => $dst_cache) : ()),
            (defined $src_cache ? (source_cache => $src_cache) : ()),
            (defined $bwlimit ? (rate_limit => int($bwlimit) * 1024) : ()),
            ($opts->{'is-zero-initialized'} ? (target_is_zero => 1) : ()),
            progress => $progress);
    };
    if (my $err = $@) {
        if (_is_instar_error($err)) {
            print STDERR "$_\n" for _stderr_lines($err);
            $err = "command '" . _cmdstr($cmd) . "' failed: exit code 1\n";
        }
        die "copy failed: $err";
    }
    return undef;
}

# The EFI-disk copy of qemu-server's clone_disk: `qemu-img dd -n -f SRCFMT -O DSTFMT [-l SNAP] bs=1M
# osize=SIZE if=SRC of=DST` into an existing target.
sub qemu_img_dd {
    my ($src_path, $src_format, $dst_path, $dst_format, $size, $snapname) = @_;
    my $cmd = ['qemu-img', 'dd', '-n', '-f', $src_format, '-O', $dst_format, ($snapname ? ('-l', $snapname) : ()),
        'bs=1M', "osize=$size", "if=$src_path", "of=$dst_path"];
    eval {
        Instar::dd($src_path, $dst_path, no_create => 1, input_format => $src_format,
            output_format => $dst_format, block_size => 1024 * 1024, output_size => int($size),
            ($snapname ? (snapshot => $snapname) : ()));
    };
    _fail_plain($cmd, $@) if $@;
    return undef;
}

1;

__END__

=head1 NAME

Instar::PVE - libinstar in place of /usr/bin/qemu-img for Proxmox VE's storage and qemu-server code

=head1 SYNOPSIS

    use Instar::PVE;

    # PVE::Storage::Common
    Instar::PVE::qemu_img_create('qcow2', $size_kib, $path, { preallocation => 'metadata' });
    Instar::PVE::qemu_img_create_qcow2_backed($path, $backing_path, 'qcow2', {});
    my $json = Instar::PVE::qemu_img_info($path, 'qcow2', 10, 0);     # qemu-img's JSON text
    my $info = Instar::PVE::qemu_img_info_struct($path, 'qcow2');     # the decoded hash, no JSON round trip
    my $m    = Instar::PVE::qemu_img_measure($size_kib, 'qcow2', 5, ['cluster_size=128k']);
    Instar::PVE::qemu_img_resize($path, 'qcow2', $bytes, 'metadata', 10);

    # PVE::Storage::Plugin
    my ($size, $format, $used, $parent, $ctime) =
        Instar::PVE::file_size_info($path, 10, 'qcow2', $untrusted);
    Instar::PVE::volume_snapshot($path, 'snap1');
    Instar::PVE::volume_snapshot_rollback($path, 'snap1');
    Instar::PVE::volume_snapshot_delete($path, 'snap1');
    Instar::PVE::qemu_img_commit($childpath);
    Instar::PVE::qemu_img_rebase($childpath, $parentpath, 'qcow2', 'qcow2');

    # qemu-server
    Instar::PVE::convert($src_volid, $dst_volid, $size, { bwlimit => 10240, snapname => 'snap1' });
    Instar::PVE::qemu_img_dd($src, 'raw', $dst, 'qcow2', $size);

=head1 DESCRIPTION

Each sub takes the arguments of the Proxmox sub it replaces and returns what that sub returns when it runs the
real qemu-img 7.2: the same JSON text for C<qemu_img_info> and C<qemu_img_measure>, the same list for
C<file_size_info>, the same images. Failures die with the message C<PVE::Tools::run_command> produces for the
same qemu-img failure (C<unable to create image: qemu-img: ...>, C<command '...' failed: exit code 1> with
qemu-img's stderr lines printed to STDERR, C<copy failed: ...>).

The snapshot, commit and rebase subs take the image path (Plugin.pm computes it with C<filesystem_path> before
running qemu-img); C<convert> resolves volume ids through C<PVE::Storage> when it is loaded and also takes
plain paths.

Progress of C<convert> is printed as qemu-server prints it (C<transferred X of Y (P%)>), or handed to
C<< $opts->{progress} >> (C<($percent, $transferred, $total)>; a true return cancels). A C<$timeout> is honoured
by the library (its per-call time limit, see L<Instar/Limits>), not by killing a child: C<qemu_img_info> and
C<qemu_img_measure> then warn C<command '...' failed: got timeout> and return an empty string as PVE's helper
does when run_command times out (C<qemu_img_info_struct> returns undef); C<qemu_img_resize> (10 s when no timeout
is given, as PVE), C<qemu_img_commit> and C<qemu_img_rebase> die with C<command '...' failed: got timeout>.
Nothing is left half-written.

=cut
