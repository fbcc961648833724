"""Indiana University chest X-ray reports (Demner-Fushman et al. 2016), as shipped in
`NLMCXR_reports.tgz`: one XML file per study with FINDINGS / IMPRESSION text and MeSH terms
such as `Opacity/lung/base/left`."""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from g2d.errors import DataError


@dataclass(frozen=True)
class IUReport:
    uid: str  # e.g. "CXR1000": one study; the collection carries no patient ids
    findings: str
    impression: str
    mesh: tuple[str, ...]  # the <major> MeSH terms, in report order

    @property
    def text(self) -> str:
        """Findings + impression, the text G2D pairs with the image."""
        parts = []
        if self.findings:
            parts.append(f"FINDINGS: {self.findings}")
        if self.impression:
            parts.append(f"IMPRESSION: {self.impression}")
        return " ".join(parts)


@dataclass
class IUReportSet:
    reports: list[IUReport]
    dropped: dict[str, int]  # reason -> count


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def parse_report(xml_bytes: bytes, member: str) -> IUReport:
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as e:
        raise DataError(f"{member}: not valid XML ({e})") from None
    uid_el = root.find("uId")
    if uid_el is None or not uid_el.get("id"):
        raise DataError(f"{member}: no <uId id=...> element")
    sections = {el.get("Label", "").upper(): _clean(el.text) for el in root.iter("AbstractText")}
    mesh = tuple(_clean(el.text) for el in root.iter("major") if _clean(el.text))
    return IUReport(uid_el.get("id"), sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""), mesh)


def read_reports(tgz: Path) -> IUReportSet:
    """All reports that have findings or impression text, sorted by uid number."""
    reports, dropped = [], {"no findings or impression text": 0}
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                report = parse_report(tar.extractfile(member).read(), f"{tgz}:{member.name}")
                if report.findings or report.impression:
                    reports.append(report)
                else:
                    dropped["no findings or impression text"] += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz}: cannot read the report archive ({e}); run `g2d data fetch`") from None
    reports.sort(key=lambda r: (int(re.sub(r"\D", "", r.uid) or 0), r.uid))
    return IUReportSet(reports, dropped)
