//! HLS media segments as MPEG transport streams: silent MPEG-1 Layer III audio plus one
//! timed ID3 tag naming the channel and media sequence number.
//!
//! Every byte is a function of the inputs, so any node can serve any segment of any channel
//! and a viewer moved between nodes mid-stream sees one continuous stream.

/// Bytes of MPEG-TS packet.
pub const TS_PACKET_BYTES: usize = 188;

const TS_HEADER_BYTES: usize = 4;
const TS_PAYLOAD_BYTES: usize = TS_PACKET_BYTES - TS_HEADER_BYTES;
const SYNC_BYTE: u8 = 0x47;

const PID_PAT: u16 = 0x0000;
const PID_PMT: u16 = 0x1000;
const PID_AUDIO: u16 = 0x0100;
const PID_ID3: u16 = 0x0101;
const PROGRAM_NUMBER: u16 = 1;
const TRANSPORT_STREAM_ID: u16 = 1;

const STREAM_TYPE_MP3: u8 = 0x03;
const STREAM_TYPE_METADATA: u8 = 0x15;
const STREAM_ID_AUDIO: u8 = 0xC0;
const STREAM_ID_PRIVATE_1: u8 = 0xBD;

/// MPEG-1 Layer III, no CRC, 128 kbit/s, 44.1 kHz, no padding, joint stereo, original.
const MP3_HEADER: [u8; 4] = [0xFF, 0xFB, 0x90, 0x64];
/// floor(144 * 128000 / 44100): the unpadded frame length for the header above.
const MP3_FRAME_BYTES: usize = 417;
const MP3_FRAME_SAMPLES: u64 = 1152;
const SAMPLE_RATE_HZ: u64 = 44_100;

const CLOCK_HZ: u64 = 90_000;
/// Keeps the first segment's timestamps clear of zero, where some players misbehave.
const PTS_OFFSET_TICKS: u64 = 10 * CLOCK_HZ;
/// PTS and PCR base are 33-bit counters.
const PTS_MODULUS_TICKS: u64 = 1 << 33;
/// How far the system clock runs ahead of presentation: time for the decoder to buffer.
const PCR_LEAD_TICKS: u64 = CLOCK_HZ / 10;
/// Three frames (78 ms) per PES keep the PCR, sent once per PES, within the 100 ms limit.
const FRAMES_PER_PES_MAX: usize = 3;
/// Bounds the output (about 10 MB) whatever duration a caller asks for.
const DURATION_MS_MAX: u32 = 600_000;
/// Bounds the ID3 tag so its sizes fit their fields; longer names are cut at a char boundary.
const CHANNEL_BYTES_MAX: usize = 1024;
/// Digits of u64::MAX: the ID3 tag is padded as if the sequence number had this many.
const SEQ_DIGITS_MAX: usize = 20;
/// Continuity counters are 4 bits.
const CC_MODULUS: u64 = 16;

/// One HLS media segment as an MPEG transport stream, derived only from its inputs so that
/// every node serving the same channel and media sequence number produces identical bytes.
pub fn segment(channel: &str, media_seq: u64, duration_ms: u32) -> Vec<u8> {
    let first_pts = first_pts(media_seq, duration_ms);
    let mut streams = [PID_PAT, PID_PMT, PID_ID3, PID_AUDIO].map(Stream::new);
    let [pat, pmt, id3, audio] = &mut streams;
    let mut out = Vec::new();
    psi_packet(&mut out, pat, &pat_section());
    psi_packet(&mut out, pmt, &pmt_section());
    // Apple's layout: the PES payload is the bare tag. ffmpeg 5.x drops its first 5 bytes,
    // mistaking them for an ISO 13818-1 metadata AU cell header; newer ffmpeg does not.
    let tag = id3_tag(channel, media_seq);
    packetize(
        &mut out,
        id3,
        &pes(STREAM_ID_PRIVATE_1, first_pts, &tag),
        None,
    );
    write_audio(&mut out, audio, first_pts, frame_count(duration_ms));
    continue_counters(&mut out, &streams, media_seq);
    out
}

/// PTS of the segment's first frame: segments of one channel tile a single timeline.
fn first_pts(media_seq: u64, duration_ms: u32) -> u64 {
    let ticks = u128::from(media_seq) * u128::from(duration_ms) * u128::from(CLOCK_HZ / 1000);
    let wrapped = (ticks + u128::from(PTS_OFFSET_TICKS)) % u128::from(PTS_MODULUS_TICKS);
    // Below 2^33 after the modulus, so the conversion cannot fail.
    u64::try_from(wrapped).unwrap_or(0)
}

/// round(duration * 44.1 kHz / 1152), at least one frame so every segment has audio.
fn frame_count(duration_ms: u32) -> usize {
    let ms = u64::from(duration_ms.min(DURATION_MS_MAX));
    let per_frame_ms_x = MP3_FRAME_SAMPLES * 1000;
    let frames = (ms * SAMPLE_RATE_HZ + per_frame_ms_x / 2) / per_frame_ms_x;
    usize::try_from(frames.max(1)).unwrap_or(1)
}

/// PTS of frame `index`, rounded to the nearest 90 kHz tick so rounding errors never add up.
fn frame_pts(first_pts: u64, index: usize) -> u64 {
    let samples = index as u64 * MP3_FRAME_SAMPLES;
    let offset = (samples * CLOCK_HZ + SAMPLE_RATE_HZ / 2) / SAMPLE_RATE_HZ;
    (first_pts + offset) % PTS_MODULUS_TICKS
}

/// The silent frames, a few per PES, each PES opening with a PCR (the audio PID is the PCR PID).
fn write_audio(out: &mut Vec<u8>, audio: &mut Stream, first_pts: u64, frames: usize) {
    let mut frame = vec![0; MP3_FRAME_BYTES];
    frame[..MP3_HEADER.len()].copy_from_slice(&MP3_HEADER);
    let mut first = 0;
    while first < frames {
        let count = FRAMES_PER_PES_MAX.min(frames - first);
        let pts = frame_pts(first_pts, first);
        let pcr = (pts + PTS_MODULUS_TICKS - PCR_LEAD_TICKS) % PTS_MODULUS_TICKS;
        let data = frame.repeat(count);
        packetize(out, audio, &pes(STREAM_ID_AUDIO, pts, &data), Some(pcr));
        first += count;
    }
}

/// The packets sent so far on one PID; the count gives the continuity counter.
struct Stream {
    pid: u16,
    packets: u64,
}

impl Stream {
    fn new(pid: u16) -> Self {
        Stream { pid, packets: 0 }
    }
}

/// Makes segment `media_seq + 1` continue segment `media_seq`'s counters, so that players
/// reading segments back to back see no continuity errors. Each PID carries the same number
/// of packets in every segment of one channel and duration (the ID3 tag is padded to a fixed
/// size), so the counter a segment starts at is `media_seq * packets` modulo 16.
fn continue_counters(ts: &mut [u8], streams: &[Stream], media_seq: u64) {
    for packet in ts.chunks_exact_mut(TS_PACKET_BYTES) {
        let pid = u16::from_be_bytes([packet[1], packet[2]]) & 0x1FFF;
        let Some(stream) = streams.iter().find(|s| s.pid == pid) else {
            continue;
        };
        let start = (media_seq % CC_MODULUS) * (stream.packets % CC_MODULUS) % CC_MODULUS;
        let cc = (u64::from(packet[3] & 0x0F) + start) % CC_MODULUS;
        packet[3] = (packet[3] & 0xF0) | cc as u8;
    }
}

/// Splits one PES across packets of its PID; only the first may carry a PCR, and the last is
/// filled to 188 bytes with adaptation-field stuffing.
fn packetize(out: &mut Vec<u8>, stream: &mut Stream, pes: &[u8], pcr: Option<u64>) {
    let mut rest = pes;
    let mut adaptation = pcr.map(pcr_adaptation);
    loop {
        let reserved = adaptation.as_ref().map_or(0, |a| 1 + a.len());
        let take = rest.len().min(TS_PAYLOAD_BYTES - reserved);
        let start = rest.len() == pes.len();
        write_packet(
            out,
            stream,
            start,
            adaptation.take().as_deref(),
            &rest[..take],
        );
        rest = &rest[take..];
        if rest.is_empty() {
            break;
        }
    }
}

/// Adaptation field body for a PES start: random access (every MP3 frame is one) and a PCR.
fn pcr_adaptation(pcr_base: u64) -> Vec<u8> {
    const RANDOM_ACCESS_AND_PCR_FLAGS: u8 = 0x50;
    let b = pcr_base;
    // 6 reserved bits set, 9-bit extension 0: the 27 MHz remainder is not needed.
    let tail = (((b & 1) << 7) as u8) | 0x7E;
    vec![
        RANDOM_ACCESS_AND_PCR_FLAGS,
        (b >> 25) as u8,
        (b >> 17) as u8,
        (b >> 9) as u8,
        (b >> 1) as u8,
        tail,
        0x00,
    ]
}

/// One packet: header, then an adaptation field (the given body, stuffed with 0xFF so the
/// payload ends the packet), then the payload.
fn write_packet(
    out: &mut Vec<u8>,
    stream: &mut Stream,
    unit_start: bool,
    adaptation: Option<&[u8]>,
    payload: &[u8],
) {
    let field_bytes = TS_PAYLOAD_BYTES.saturating_sub(payload.len());
    let control = if field_bytes == 0 { 0x10 } else { 0x30 };
    let cc = (stream.packets % CC_MODULUS) as u8;
    stream.packets += 1;
    let [pid_hi, pid_lo] = stream.pid.to_be_bytes();
    let start_flag = if unit_start { 0x40 } else { 0x00 };
    out.extend_from_slice(&[
        SYNC_BYTE,
        start_flag | (pid_hi & 0x1F),
        pid_lo,
        control | cc,
    ]);
    if field_bytes > 0 {
        out.push((field_bytes - 1) as u8);
    }
    if field_bytes > 1 {
        let body = adaptation.unwrap_or(&[0x00]);
        out.extend_from_slice(body);
        out.resize(
            out.len() + (field_bytes - 1).saturating_sub(body.len()),
            0xFF,
        );
    }
    out.extend_from_slice(payload);
}

/// A PSI section in one packet: pointer field 0, the section, 0xFF filler.
fn psi_packet(out: &mut Vec<u8>, stream: &mut Stream, section: &[u8]) {
    let mut payload = Vec::with_capacity(TS_PAYLOAD_BYTES);
    payload.push(0x00);
    payload.extend_from_slice(section);
    payload.resize(TS_PAYLOAD_BYTES, 0xFF);
    write_packet(out, stream, true, None, &payload);
}

/// Program association: the one program and where its PMT is.
fn pat_section() -> Vec<u8> {
    let mut body = PROGRAM_NUMBER.to_be_bytes().to_vec();
    body.extend_from_slice(&pid_field(0xE000, PID_PMT));
    section(0x00, TRANSPORT_STREAM_ID, &body)
}

/// Program map: MP3 audio (the PCR PID) and Apple-style timed ID3 metadata.
fn pmt_section() -> Vec<u8> {
    // metadata_pointer_descriptor: ID3 metadata is carried in this very program.
    let mut pointer = vec![0x25, 0x0F];
    pointer.extend_from_slice(&ID3_FORMAT_IDS);
    pointer.extend_from_slice(&[0x00, 0x1F]); // service 0; no locator, carriage in this TS
    pointer.extend_from_slice(&PROGRAM_NUMBER.to_be_bytes());
    // metadata_descriptor: the ES holds ID3 tags; no decoder config, no DSM-CC.
    let mut metadata = vec![0x26, 0x0D];
    metadata.extend_from_slice(&ID3_FORMAT_IDS);
    metadata.extend_from_slice(&[0x00, 0x0F]);
    let mut body = pid_field(0xE000, PID_AUDIO).to_vec();
    body.extend_from_slice(&length_field(pointer.len()));
    body.extend_from_slice(&pointer);
    body.extend_from_slice(&es_entry(STREAM_TYPE_MP3, PID_AUDIO, &[]));
    body.extend_from_slice(&es_entry(STREAM_TYPE_METADATA, PID_ID3, &metadata));
    section(0x02, PROGRAM_NUMBER, &body)
}

/// metadata_application_format 0xFFFF and metadata_format 0xFF, each identified as "ID3 ".
const ID3_FORMAT_IDS: [u8; 11] = [
    0xFF, 0xFF, b'I', b'D', b'3', b' ', 0xFF, b'I', b'D', b'3', b' ',
];

/// One elementary stream entry of the PMT.
fn es_entry(stream_type: u8, pid: u16, descriptors: &[u8]) -> Vec<u8> {
    let mut entry = vec![stream_type];
    entry.extend_from_slice(&pid_field(0xE000, pid));
    entry.extend_from_slice(&length_field(descriptors.len()));
    entry.extend_from_slice(descriptors);
    entry
}

/// A 13-bit PID under reserved high bits.
fn pid_field(reserved: u16, pid: u16) -> [u8; 2] {
    (reserved | (pid & 0x1FFF)).to_be_bytes()
}

/// A 12-bit length under four reserved bits (all ours are far below 4096).
fn length_field(len: usize) -> [u8; 2] {
    (0xF000 | (len as u16 & 0x0FFF)).to_be_bytes()
}

/// A long-form PSI section, version 0, current, single: header, body, CRC.
fn section(table_id: u8, id: u16, body: &[u8]) -> Vec<u8> {
    const HEADER_AFTER_LENGTH_BYTES: usize = 5;
    const CRC_BYTES: usize = 4;
    let length = HEADER_AFTER_LENGTH_BYTES + body.len() + CRC_BYTES;
    let [len_hi, len_lo] = (0xB000 | (length as u16 & 0x0FFF)).to_be_bytes();
    let [id_hi, id_lo] = id.to_be_bytes();
    let mut s = vec![table_id, len_hi, len_lo, id_hi, id_lo, 0xC1, 0x00, 0x00];
    s.extend_from_slice(body);
    let crc = crc32_mpeg2(&s);
    s.extend_from_slice(&crc.to_be_bytes());
    s
}

/// A PES packet with a PTS and the data-alignment flag (each PES starts a frame or a tag).
fn pes(stream_id: u8, pts: u64, data: &[u8]) -> Vec<u8> {
    const HEADER_AFTER_LENGTH_BYTES: usize = 8;
    // Zero means "unbounded"; only reached by data no segment here produces.
    let length = u16::try_from(HEADER_AFTER_LENGTH_BYTES + data.len()).unwrap_or(0);
    let [len_hi, len_lo] = length.to_be_bytes();
    let mut p = vec![
        0x00, 0x00, 0x01, stream_id, len_hi, len_lo, 0x84, 0x80, 0x05,
    ];
    p.extend_from_slice(&pts_field(pts));
    p.extend_from_slice(data);
    p
}

/// The 5-byte PTS-only field: '0010', then 33 bits split 3/15/15 by marker bits.
fn pts_field(pts: u64) -> [u8; 5] {
    [
        0x21 | ((pts >> 29) & 0x0E) as u8,
        (pts >> 22) as u8,
        0x01 | ((pts >> 14) & 0xFE) as u8,
        (pts >> 7) as u8,
        0x01 | ((pts << 1) & 0xFE) as u8,
    ]
}

/// An ID3v2.4 tag with TXXX "handover" = "{channel}/{media_seq}", the segment's own name.
/// Padded as if the number had 20 digits, so its size depends on the channel alone.
fn id3_tag(channel: &str, media_seq: u64) -> Vec<u8> {
    const UTF8: u8 = 0x03;
    let seq = media_seq.to_string();
    let mut frame = vec![UTF8];
    frame.extend_from_slice(b"handover\0");
    frame.extend_from_slice(truncate(channel, CHANNEL_BYTES_MAX).as_bytes());
    frame.push(b'/');
    frame.extend_from_slice(seq.as_bytes());
    let padding = SEQ_DIGITS_MAX.saturating_sub(seq.len());
    let mut tag = b"ID3\x04\x00\x00".to_vec();
    tag.extend_from_slice(&syncsafe(10 + frame.len() + padding));
    tag.extend_from_slice(b"TXXX");
    tag.extend_from_slice(&syncsafe(frame.len()));
    tag.extend_from_slice(&[0x00, 0x00]);
    tag.extend_from_slice(&frame);
    tag.resize(tag.len() + padding, 0x00);
    tag
}

/// The longest prefix of `s` of at most `max_bytes` bytes that ends on a char boundary.
fn truncate(s: &str, max_bytes: usize) -> &str {
    let mut end = s.len().min(max_bytes);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// ID3v2's 28-bit size: four bytes of seven bits each, so no size byte looks like a sync.
fn syncsafe(size: usize) -> [u8; 4] {
    let n = size as u32;
    [(n >> 21) as u8, (n >> 14) as u8, (n >> 7) as u8, n as u8].map(|b| b & 0x7F)
}

/// CRC-32/MPEG-2 (poly 0x04C11DB7, init all ones, no reflection, no final xor), as PSI uses.
fn crc32_mpeg2(data: &[u8]) -> u32 {
    data.iter().fold(0xFFFF_FFFF, |crc, &byte| {
        (crc << 8) ^ CRC_TABLE[usize::from((crc >> 24) as u8 ^ byte)]
    })
}

const CRC_TABLE: [u32; 256] = crc_table();

/// The byte-at-a-time table for `crc32_mpeg2`, built at compile time.
const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::process::{Command, Output};

    fn packets(ts: &[u8]) -> impl Iterator<Item = &[u8]> {
        ts.chunks(TS_PACKET_BYTES)
    }

    fn pid(packet: &[u8]) -> u16 {
        u16::from_be_bytes([packet[1], packet[2]]) & 0x1FFF
    }

    fn has_payload(packet: &[u8]) -> bool {
        packet[3] & 0x10 != 0
    }

    /// The payload after the header and any adaptation field.
    fn payload(packet: &[u8]) -> &[u8] {
        if packet[3] & 0x20 != 0 {
            &packet[5 + usize::from(packet[4])..]
        } else {
            &packet[4..]
        }
    }

    fn first_unit(ts: &[u8], wanted: u16) -> &[u8] {
        packets(ts)
            .find(|p| pid(p) == wanted && p[1] & 0x40 != 0)
            .map(payload)
            .expect("no unit start on PID")
    }

    /// The PSI section in a PID's first packet, cut to its declared length.
    fn section_of(ts: &[u8], wanted: u16) -> &[u8] {
        let unit = first_unit(ts, wanted);
        let s = &unit[1 + usize::from(unit[0])..];
        let length = usize::from(u16::from_be_bytes([s[1], s[2]]) & 0x0FFF);
        &s[..3 + length]
    }

    fn decode_pts(f: &[u8]) -> u64 {
        (u64::from(f[0] & 0x0E) << 29)
            | (u64::from(f[1]) << 22)
            | (u64::from(f[2] & 0xFE) << 14)
            | (u64::from(f[3]) << 7)
            | (u64::from(f[4]) >> 1)
    }

    #[test]
    fn deterministic_and_sequence_dependent() {
        assert_eq!(segment("news", 7, 6000), segment("news", 7, 6000));
        assert_ne!(segment("news", 7, 6000), segment("news", 8, 6000));
        assert_ne!(segment("news", 7, 6000), segment("sport", 7, 6000));
    }

    #[test]
    fn packets_are_well_formed() {
        for (channel, seq, ms) in [("news", 0, 2000), ("", u64::MAX, 6000), ("x", 3, 0)] {
            let ts = segment(channel, seq, ms);
            assert!(!ts.is_empty());
            assert_eq!(ts.len() % TS_PACKET_BYTES, 0);
            assert!(packets(&ts).all(|p| p[0] == SYNC_BYTE));
        }
    }

    #[test]
    fn continuity_counters_step_by_one_per_pid() {
        // Two consecutive segments back to back: continuity holds across the seam too.
        let mut ts = segment("news", 41, 2000);
        ts.extend(segment("news", 42, 2000));
        ts.extend(segment("news", 43, 2000));
        let mut last: HashMap<u16, u8> = HashMap::new();
        for p in packets(&ts).filter(|p| has_payload(p)) {
            let cc = p[3] & 0x0F;
            if let Some(prev) = last.insert(pid(p), cc) {
                assert_eq!(cc, (prev + 1) % 16, "PID {:#x}", pid(p));
            }
        }
        assert_eq!(last.len(), 4);
    }

    #[test]
    fn continuity_holds_across_u64_wrap() {
        let mut ts = segment("news", u64::MAX, 2000);
        ts.extend(segment("news", 0, 2000));
        let mut last: HashMap<u16, u8> = HashMap::new();
        for p in packets(&ts).filter(|p| has_payload(p)) {
            if let Some(prev) = last.insert(pid(p), p[3] & 0x0F) {
                assert_eq!(p[3] & 0x0F, (prev + 1) % 16);
            }
        }
    }

    #[test]
    fn psi_crcs_verify() {
        let ts = segment("news", 5, 6000);
        for wanted in [PID_PAT, PID_PMT] {
            // The CRC over a whole section, its own CRC field included, is zero.
            assert_eq!(crc32_mpeg2(section_of(&ts, wanted)), 0, "PID {wanted:#x}");
        }
        assert_eq!(crc32_mpeg2(b"123456789"), 0x0376_E6E7);
    }

    #[test]
    fn first_audio_pts_is_sequence_times_duration_plus_offset() {
        let ts = segment("news", 1234, 6000);
        let pes = first_unit(&ts, PID_AUDIO);
        assert_eq!(&pes[..4], &[0x00, 0x00, 0x01, STREAM_ID_AUDIO]);
        assert_eq!(decode_pts(&pes[9..14]), 1234 * 6000 * 90 + 900_000);
        assert_eq!(&pes[14..18], &MP3_HEADER);
    }

    #[test]
    fn pts_wraps_at_33_bits() {
        let ts = segment("news", u64::MAX, 6000);
        let expected = (u128::from(u64::MAX) * 6000 * 90 + 900_000) % (1u128 << 33);
        let pes = first_unit(&ts, PID_AUDIO);
        assert_eq!(u128::from(decode_pts(&pes[9..14])), expected);
    }

    #[test]
    fn id3_tag_names_channel_and_sequence() {
        let ts = segment("news-1", 99, 2000);
        let pes = first_unit(&ts, PID_ID3);
        assert_eq!(&pes[..4], &[0x00, 0x00, 0x01, STREAM_ID_PRIVATE_1]);
        assert_eq!(decode_pts(&pes[9..14]), 99 * 2000 * 90 + 900_000);
        let tag = &pes[14..];
        assert_eq!(&tag[..4], b"ID3\x04");
        let needle = b"handover\0news-1/99";
        assert!(tag.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn frame_counts_round_to_nearest() {
        assert_eq!(frame_count(2000), 77);
        assert_eq!(frame_count(6000), 230);
        assert_eq!(frame_count(0), 1);
        assert_eq!(frame_count(u32::MAX), frame_count(DURATION_MS_MAX));
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let long = "é".repeat(64);
        let huge = "ü".repeat(5000);
        for channel in ["", long.as_str(), huge.as_str()] {
            for seq in [0, 1, u64::MAX] {
                for ms in [0, 1, 2000, 6000] {
                    assert_eq!(segment(channel, seq, ms).len() % TS_PACKET_BYTES, 0);
                }
            }
        }
    }

    /// Writes a segment to a temp file, runs ffprobe with `args` on it, deletes the file.
    fn ffprobe(name: &str, ms: u32, args: &[&str]) -> Output {
        let file: PathBuf =
            std::env::temp_dir().join(format!("handover-ts-{name}-{}-{ms}.ts", std::process::id()));
        std::fs::write(&file, segment("news", 42, ms)).expect("write temp segment");
        let output = Command::new("ffprobe").args(args).arg(&file).output();
        let _ = std::fs::remove_file(&file);
        output.unwrap_or_else(|e| {
            panic!(
                "cannot run ffprobe ({e}); install Debian's ffmpeg package: apt-get install ffmpeg"
            )
        })
    }

    #[test]
    fn ffprobe_finds_mp3_and_timed_id3() {
        let args = ["-v", "error", "-show_streams", "-of", "json"];
        let output = ffprobe("streams", 2000, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "ffprobe failed: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        let streams = json["streams"].as_array().expect("streams");
        let audio = streams.iter().find(|s| s["codec_name"] == "mp3");
        let audio = audio.expect("an mp3 stream");
        assert_eq!(audio["codec_type"], "audio");
        assert_eq!(audio["sample_rate"], "44100");
        let id3 = streams.iter().find(|s| s["codec_name"] == "timed_id3");
        assert_eq!(id3.expect("a timed_id3 stream")["codec_type"], "data");
    }

    #[test]
    fn ffprobe_reports_no_errors_when_counting_packets() {
        for ms in [2000, 6000] {
            let args = ["-v", "error", "-count_packets", "-show_streams"];
            let output = ffprobe("count", ms, &args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success(),
                "ffprobe failed for {ms} ms: {stderr}"
            );
            assert!(
                stderr.trim().is_empty(),
                "ffprobe errors for {ms} ms: {stderr}"
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            let frames = frame_count(ms);
            assert!(
                stdout.contains(&format!("nb_read_packets={frames}")),
                "{stdout}"
            );
        }
    }
}
